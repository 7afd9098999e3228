"""Pipelined training steps of tiny stock transformers models, one per model family and schedule, in one
process group (one launch covers them all). Run under torchrun by tests/parallel/test_hf_pipeline.py:

    torchrun --nproc-per-node N tests/parallel/hf_pipeline_worker.py OUT_DIR MICROBATCHES LAYERS MODEL,... SCHEDULE...

Each rank writes OUT_DIR/{model}.{schedule}.rank{r}.pt with its stages' parameter gradients (by full-model
name) and the per-microbatch losses of the last stage; every run starts from the same freshly built model.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.parallel.hf_pipeline_models import build_model, make_batch  # noqa: E402
from tests.parallel.pipeline_models import loss_fn_for  # noqa: E402
from plait.parallel.hf_pipeline import build_hf_pipeline  # noqa: E402


def main() -> None:
    out, microbatches, layers, kinds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    for kind, schedule in [(k, s) for k in kinds for s in sys.argv[5:]]:
        ids, labels, vision = make_batch(kind)
        run = build_hf_pipeline(build_model(kind, layers), rank=rank, ranks=ranks, schedule=schedule,
                                microbatches=microbatches, loss_fn=loss_fn_for(labels), device=torch.device("cpu"))
        losses = run.step(ids, labels, vision)
        grads = {name: p.grad.clone() for name, p in run.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "losses": [float(x.detach()) for x in losses], "stages": run.stage_ids},
                   out / f"{kind}.{schedule}.rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a neighbour's last transfers are in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
