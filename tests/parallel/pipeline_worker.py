"""One pipelined training step of a tiny native model, run under torchrun by tests/parallel/test_pipeline.py.

    torchrun --nproc-per-node N tests/parallel/pipeline_worker.py OUT_DIR SCHEDULE MICROBATCHES [MODEL]

Each rank writes OUT_DIR/rank{r}.pt with its stages' parameter gradients (by full-model name) and the
per-microbatch losses of the last stage.
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
from plait.nn.moe import route_aux_loss_through_backward  # noqa: E402
from plait.parallel.pipeline import build_pipeline  # noqa: E402


def main() -> None:
    out, schedule, microbatches = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    kind = sys.argv[4] if len(sys.argv) > 4 else "mimo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    model = build_model(kind)
    route_aux_loss_through_backward(model, 1.0 / microbatches)
    ids, labels = make_batch(kind)
    run = build_pipeline(model, rank=rank, ranks=ranks, schedule=schedule, microbatches=microbatches,
                         loss_fn=loss_fn_for(labels, mtp_depths_of(model)), device=torch.device("cpu"))
    losses = run.step(ids, labels, vision_inputs(model, kind), **first_stage_inputs(kind))
    grads = {name: p.grad.clone() for name, p in run.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "losses": [float(x) for x in losses], "stages": run.stage_ids}, out / f"rank{rank}.pt")
    dist.barrier()  # torch's schedules may return with the last sends still in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
