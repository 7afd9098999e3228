"""`plait train | eval | generate | inspect`: the command line over plait's library.

Bad input (a config key, a file, a checkpoint) ends the command with `error: ...` and exit code 2,
without a traceback and before anything is written.
"""

from __future__ import annotations

import json
import sys
from inspect import signature
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and fine-tune multimodal mixture-of-experts language models.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides, e.g. train.steps=50")]


# what a command reports as `error: ...` with exit code 2: bad input, and paths that cannot be made or read
USER_ERRORS = (ValueError, OSError)


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(code=2)


def _checkpoint_run_config(ckpt: Path, overrides: list[str]):
    """The run config saved beside a checkpoint, pointed at the checkpoint's own weights."""
    from plait.checkpoint import check_model_dir
    from plait.config import load_config
    from plait.train import RUN_CONFIG_FILE

    check_model_dir(ckpt)
    saved = ckpt / RUN_CONFIG_FILE
    base = ["model.preset=null", f"model.pretrained={ckpt}", "model.config={}", "model.mimo=null"]
    return load_config(saved if saved.is_file() else None, base + overrides)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML, e.g. configs/default.yaml")],
    overrides: Overrides = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="show the resolved config and exit")] = False,
) -> None:
    """Train a model as the config says; evaluate it on held-out data and save it in HF format."""
    from plait.config import load_config

    try:
        cfg = load_config(config, overrides or [])
        if print_config:
            console.print(cfg.to_yaml(), highlight=False, end="")
            return
        from plait.train import train as run_training

        run_training(cfg, console=console)
    except USER_ERRORS as e:
        _fail(e)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="a model dir saved by plait (config.json + safetensors)")],
    overrides: Overrides = None,
) -> None:
    """Held-out loss and exact-match accuracy of a saved model on its run's data (or data.* overrides)."""
    try:
        cfg = _checkpoint_run_config(checkpoint, overrides or [])
        from plait.data.tokenizer import load_tokenizer
        from plait.evaluate import evaluate_dataset
        from plait.train import autocast_for, prepare_run, report_eval

        run = prepare_run(cfg, tokenizer=load_tokenizer(checkpoint))
        metrics = evaluate_dataset(run.model, run.datasets[cfg.eval.split], run.model_inputs, run.tokenizer,
                                    num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size,
                                    max_new_tokens=cfg.eval.max_new_tokens, device=run.device,
                                    autocast=autocast_for(run.device, cfg.train.autocast))
        report_eval(console, metrics, cfg.eval.split)
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="a model dir saved by plait")],
    image: Annotated[list[Path], typer.Option("--image", help="image file(s) to caption")],
    prompt: Annotated[Optional[str], typer.Option(help="text after the image (default: the run's data.prompt)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 48,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="sample from the k most likely tokens")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = None,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    speculative: Annotated[bool, typer.Option(
        help="greedy self-speculative decoding: the model's MTP depths draft, one forward verifies")] = False,
    draft_tokens: Annotated[Optional[int], typer.Option(help="drafts per step (default: every MTP depth)")] = None,
    native_resolution: Annotated[bool, typer.Option(
        "--native-resolution",
        help="MiniMax-M3-VL only: feed each image at its own size and aspect ratio (resized to multiples of "
             "patch x merge within --min-pixels..--max-pixels, one placeholder per merged patch) instead of the "
             "run's data.image_size square the model was trained on (the default)")] = False,
    min_pixels: Annotated[Optional[int], typer.Option(
        help="with --native-resolution: fewest pixels an image is resized to (default: the checkpoint's "
             "processor config, else transformers' 3136)")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(
        help="with --native-resolution: most pixels an image is resized to (default: the checkpoint's "
             "processor config, else transformers' 451584)")] = None,
) -> None:
    """Caption images with a saved model (greedy, or sampled with --temperature; --speculative drafts with
    the model's MTP depths and gives the greedy captions in fewer forwards).

    Images are resized to the run's data.image_size square, as in training; --native-resolution keeps each
    image's own size for MiniMax-M3-VL (its dynamic resolution)."""
    try:
        import torch

        import plait
        from plait.data.dataset import CaptionDataset
        from plait.data.images import load_image, normalize, resize_to_square
        from plait.data.tokenizer import load_tokenizer, special_token_ids
        from plait.data.types import CaptionSplit
        from plait.generate import generate as decode
        from plait.models.vlm import vlm_spec
        from plait.speculative import SpeculativeStats, generate_speculative

        if speculative and (temperature != 0.0 or top_k is not None or top_p is not None):
            raise ValueError("--speculative decodes greedily: it takes no --temperature, --top-k or --top-p")
        if draft_tokens is not None and not speculative:
            raise ValueError("--draft-tokens: only with --speculative")
        if (min_pixels is not None or max_pixels is not None) and not native_resolution:
            raise ValueError("--min-pixels / --max-pixels: only with --native-resolution")
        cfg = _checkpoint_run_config(checkpoint, [])
        size = cfg.data.image_size
        prompt_text = cfg.data.prompt if prompt is None else prompt
        images = [load_image(p) for p in image]  # a bad file fails before the model loads
        tokenizer = load_tokenizer(checkpoint)
        model = plait.from_pretrained(checkpoint).eval()
        special = special_token_ids(tokenizer)
        attention_mask = None
        if native_resolution:
            prompt_ids, attention_mask, vision = _native_resolution_inputs(
                model, checkpoint, image, images, tokenizer, prompt_text, min_pixels, max_pixels)
        else:
            pixels = torch.stack([resize_to_square(img, size) for img in images])
            spec = vlm_spec(model.config.model_type)
            # A one-sample dataset builds the prompt exactly as training did.
            ds = CaptionDataset(CaptionSplit(pixels[:1], ["x"]), tokenizer, spec.image_token_count(model.config, size),
                                prompt_text)
            prompt_ids = ds.prompt_ids().expand(len(image), -1)
            vision = spec.vision_inputs(model.config, normalize(pixels))
        stats = SpeculativeStats()
        if speculative:
            new = generate_speculative(model, prompt_ids, attention_mask, max_new_tokens=max_new_tokens,
                                       eos_token_id=special["eos"], pad_token_id=special["pad"],
                                       num_draft_tokens=draft_tokens, stats=stats, **vision)
        else:
            new = decode(model, prompt_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=special["eos"],
                         pad_token_id=special["pad"], temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=torch.Generator().manual_seed(seed), **vision)
        for path, text in zip(image, tokenizer.batch_decode(new, skip_special_tokens=True)):
            console.print(f"{path}: {text.strip()}", highlight=False)
        if speculative:
            rates = ", ".join(f"depth {d + 1} {r:.2f}" for d, r in enumerate(stats.acceptance_rate))
            console.print(f"speculative: {stats.tokens_per_forward:.2f} tokens per forward over {stats.rounds} "
                          f"verification forwards; draft acceptance {rates}", highlight=False)
    except USER_ERRORS as e:
        _fail(e)


def _native_resolution_inputs(model, checkpoint: Path, paths: list[Path], images: list, tokenizer, prompt: str,
                              min_pixels: int | None, max_pixels: int | None):
    """Left-padded prompts (one per image, `<bos> <image> x n prompt` with n the image's merged patches),
    their attention mask, and the M3 vision inputs for `images` at their own resolutions."""
    from dataclasses import replace

    import torch

    from plait.data.dataset import CaptionDataset
    from plait.data.m3_processing import PlaceholderTokens, expand_placeholders, load_settings, preprocess_images
    from plait.data.tokenizer import special_token_ids
    from plait.data.types import CaptionSplit
    from plait.generate import left_pad

    model_type = model.config.model_type
    if model_type != "minimax_m3_vl":
        raise ValueError(f"--native-resolution: only MiniMax-M3-VL checkpoints (minimax_m3_vl) take images at their "
                         f"own resolution; this one is {model_type!r}")
    settings, _ = load_settings(model.config, checkpoint)
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        settings = replace(settings, **bounds)
    except ValueError as e:  # name the options the user typed
        raise ValueError(f"--min-pixels / --max-pixels: {e}") from e
    per_image = []
    for path, img in zip(paths, images):
        try:
            per_image.append(preprocess_images([img], settings))
        except ValueError as e:
            raise ValueError(f"--image {path}: {e}") from e
    vision = {key: torch.cat([v[key] for v in per_image]) for key in ("pixel_values", "image_grid_thw")}
    # The training layout with a single placeholder, which expand_placeholders widens per image.
    one = CaptionDataset(CaptionSplit(torch.zeros((1, 1, 1, 3), dtype=torch.uint8), ["x"]), tokenizer, 1, prompt)
    ids = special_token_ids(tokenizer)
    tokens = PlaceholderTokens(image=ids["image"], video=ids["video"])
    prompts = [torch.tensor(expand_placeholders(one.prompt_ids(), image_grid_thw=grid[None], tokens=tokens,
                                                merge_size=settings.merge_size))
               for grid in vision["image_grid_thw"]]
    prompt_ids, attention_mask = left_pad(prompts, one.pad_id)
    return prompt_ids, attention_mask, vision


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint dir (checkpoints/step_N) of a plait run")],
    output: Annotated[Path, typer.Argument(help="where to write the HF model dir")],
    fp8: Annotated[bool, typer.Option("--fp8", help="write the linear weights block-quantized to float8 e4m3, "
                                      "the MiMo-V2-Flash / DeepSeek-V3 release format (native models)")] = False,
    fp8_block: Annotated[int, typer.Option(help="with --fp8: the side of the square blocks that share one scale")] = 128,
) -> None:
    """Write the HF model of a training checkpoint (weights, config, tokenizer; no optimizer state)."""
    try:
        import plait
        from plait.checkpoint import write_dir_atomically
        from plait.data.tokenizer import load_tokenizer
        from plait.train import RUN_CONFIG_FILE, write_model_dir

        if output.exists() or output.is_symlink():  # checked first: the write replaces whatever is there
            raise ValueError(f"output: expected a path that does not exist yet, got the existing {output}")
        if fp8 and fp8_block <= 0:
            raise ValueError(f"--fp8-block: expected a positive block side, got {fp8_block}")
        model = plait.from_pretrained(checkpoint)
        if fp8 and "fp8_block_size" not in signature(model.save_pretrained).parameters:
            raise ValueError(f"--fp8: plait writes FP8 checkpoints of its native models (mimo_v2_flash, "
                             f"minimax_m3_vl); {checkpoint} holds a {type(model).__name__}")
        tokenizer = load_tokenizer(checkpoint)
        run_config = checkpoint / RUN_CONFIG_FILE
        run_config_yaml = run_config.read_text() if run_config.is_file() else None
        block = (fp8_block, fp8_block) if fp8 else None
        write_dir_atomically(output, lambda tmp: write_model_dir(tmp, model, tokenizer, run_config_yaml,
                                                                 fp8_block_size=block))
        console.print(f"wrote {output}")
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def inspect(
    target: Annotated[Path, typer.Argument(help="a run config YAML or a model dir")],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Parameter counts per module, total vs active parameters (MoE), and layer types."""
    try:
        from plait.summary import summarize

        if target.is_dir():
            import plait

            model = plait.from_pretrained(target)
        else:
            from plait.config import load_config
            from plait.train import prepare_run

            model = prepare_run(load_config(target, overrides or [])).model
        info = summarize(model)
    except USER_ERRORS as e:
        _fail(e)
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{info['class']} ({info['model_type']})")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    table.add_column("kind")
    for name, n, note in info["modules"]:
        table.add_row(name, f"{n:,}", note)
    console.print(table)
    console.print(f"total parameters: {info['total_parameters']:,}")
    console.print(f"active parameters per token: {info['active_parameters']:,}")
    console.print(f"layer types: {', '.join(info['layer_types']) or 'n/a'}")
    if info["mlp_layer_types"]:
        console.print(f"mlp layer types: {', '.join(info['mlp_layer_types'])}")


BENCHMARKS = ("blocks", "train_step", "pipeline_bubble", "speculative")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"which benchmark: {', '.join(BENCHMARKS)}")],
) -> None:
    """Run a side-by-side benchmark from a plait checkout's benchmarks/ (extra options go to it, e.g. --quick)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if name not in BENCHMARKS:
        _fail(ValueError(f"benchmark {name!r}: expected one of {list(BENCHMARKS)}"))
    if not script.is_file():
        _fail(ValueError(f"benchmark {name!r}: {script} not found; benchmarks run from a plait source checkout"))
    raise typer.Exit(subprocess.call([sys.executable, str(script), *ctx.args]))


def main() -> None:
    app(prog_name="plait")


if __name__ == "__main__":
    sys.exit(main())
