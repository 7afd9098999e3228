"""One pipelined training step of a tiny native model, run under torchrun by tests/parallel/test_pipeline.py.

    torchrun --nproc-per-node N tests/parallel/pipeline_worker.py OUT_DIR SCHEDULE MICROBATCHES [MODEL [DP]]

With DP > 1 the N processes form plait's ("pp", "dp") mesh of N / DP pipeline ranks x DP replicas; replica r
runs the r-th contiguous block of the batch's rows with the loss normalised over the whole batch, and the
stages' gradients are summed over the replicas (`sum_gradients_over_replicas`).

Each rank writes OUT_DIR/rank{r}.pt with its stages' parameter gradients (by full-model name), the
per-microbatch losses of the last stage, its mesh coordinates and the gradient norm over the whole pipeline.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.parallel.pipeline_models import (  # noqa: E402
    build_model,
    first_stage_inputs,
    loss_fn_for,
    make_batch,
    mtp_depths_of,
    vision_inputs,
)
from plait.config import ParallelSettings  # noqa: E402
from plait.nn.moe import route_aux_loss_through_backward  # noqa: E402
from plait.parallel.data_parallel import (  # noqa: E402
    clip_grad_norm_over_stages,
    init_distributed,
    sum_gradients_over_replicas,
)
from plait.parallel.pipeline import build_pipeline  # noqa: E402


def main() -> None:
    out, schedule, microbatches = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    kind = sys.argv[4] if len(sys.argv) > 4 else "mimo"
    dp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ctx = init_distributed(ParallelSettings(pp=dist.get_world_size() // dp, dp=dp), torch.device("cpu"))
    model = build_model(kind)
    route_aux_loss_through_backward(model, 1.0 / (microbatches * dp))  # the mean over every replica's forwards
    if dp > 1 and (vision_inputs(model, kind) is not None or first_stage_inputs(kind)):
        raise ValueError(f"{kind}: this worker shards text batches only")
    ids, labels = make_batch(kind)
    loss_fn = loss_fn_for(labels, mtp_depths_of(model))  # normalised over the whole batch's targets
    mine = slice(ctx.dp_rank * ids.shape[0] // dp, (ctx.dp_rank + 1) * ids.shape[0] // dp)
    run = build_pipeline(model, rank=ctx.pp_rank, ranks=ctx.pp_size, group=ctx.pp_group, schedule=schedule,
                         microbatches=microbatches, loss_fn=loss_fn, device=torch.device("cpu"))
    losses = run.step(ids[mine], labels[mine], vision_inputs(model, kind), **first_stage_inputs(kind))
    sum_gradients_over_replicas(list(run.parameters()), ctx)
    grads = {name: p.grad.clone() for name, p in run.named_parameters() if p.grad is not None}
    norm = float(clip_grad_norm_over_stages(run.parameters(), None, ctx))
    torch.save({"grads": grads, "losses": [float(x) for x in losses], "stages": run.stage_ids,
                "mesh": (ctx.pp_rank, ctx.dp_rank), "grad_norm": norm}, out / f"rank{ctx.rank}.pt")
    dist.barrier()  # torch's schedules may return with the last sends still in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
