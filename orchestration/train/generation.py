"""Text to images (or video frames) with a stage-2 model: in memory, or from an export to PNG files.

Ray-free: ``jobs/generate.py`` and the end-of-run evaluation both use it.
"""

from __future__ import annotations

import os

import torch

from orchestration.train.outputs import load_lm_export


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], seed: int = 0, num_frames: int = 1, **kwargs) -> list:
    """PIL images (num_frames = 1) or lists of frames (video) for text prompts, with CFG."""
    from vilau_model.sequence import SequenceBuilder

    builder = SequenceBuilder(tokenizer, code_depth=model.code_depth)
    # A CPU generator on any device (``generation.sample`` draws on it): the same seed, the same samples.
    generator = torch.Generator().manual_seed(seed)
    template = getattr(model, "conversation", None)
    if template is not None:  # an imported release: its chat template, its unconditional prompt (empty user turn)
        from vilau_model.released_format import template_prompt_ids
        from vilau_model.tokenizer import IM_START, VI_START

        marker = VI_START if num_frames > 1 else IM_START
        ids = [template_prompt_ids(tokenizer, template, p, marker) for p in prompts]
        kwargs.setdefault("unconditional", template_prompt_ids(tokenizer, template, "", marker))
    else:
        ids = [builder.generation_prompt(p) for p in prompts]
    return model.generate_images(ids, generator=generator, num_frames=num_frames, **kwargs).images


def generation_device(name: str = "auto") -> torch.device:
    """The device to generate on: ``auto`` = the (first) GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fresh_output_folder(out_dir: str) -> str:
    """The next unused ``<out_dir>/gen-NNNN`` folder, made now: a rerun never overwrites earlier outputs."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    n = 1 + max((int(name[4:]) for name in os.listdir(out_dir) if name.startswith("gen-") and name[4:].isdigit()), default=0)
    while True:
        folder = os.path.join(out_dir, f"gen-{n:04d}")
        try:
            os.makedirs(folder)  # exclusive: two concurrent runs never share a folder
            return folder
        except FileExistsError:
            n += 1


def generate_to_files(export_dir: str, prompts: list[str], out_dir: str, video: bool = False, seed: int = 0,
                      device: str = "auto", num_samples: int = 1, **kwargs) -> list[str]:
    """``num_samples`` PNGs per prompt (or a folder of frame PNGs per sample for video) in a new folder
    under ``out_dir`` (see fresh_output_folder); returns the paths, prompt by prompt."""
    model, tokenizer = load_lm_export(export_dir, device=generation_device(device))
    frames = model.config.frames_per_video if video else 1
    batch = [p for p in prompts for _ in range(num_samples)]  # one sampling stream: every sample differs
    results = generate(model, tokenizer, batch, seed=seed, num_frames=frames, **kwargs)
    folder = fresh_output_folder(out_dir)
    paths = []
    for k, result in enumerate(results):
        name = f"prompt{k // num_samples:02d}_sample{k % num_samples:02d}"
        if video:
            os.makedirs(os.path.join(folder, name))
            for t, frame in enumerate(result):
                paths.append(os.path.join(folder, name, f"frame_{t:02d}.png"))
                frame.save(paths[-1])
        else:
            paths.append(os.path.join(folder, f"{name}.png"))
            result.save(paths[-1])
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("\n".join(f"prompt{i:02d}: {p}" for i, p in enumerate(prompts)) + f"\nseed: {seed}\n")
    return paths
