"""Device audit: every code path that runs on a GPU, run on fake CUDA tensors on this CPU machine.

``FakeTensorMode`` lets tensors claim device "cuda" without a driver and raises
``FakeTensorDeviceMismatchError`` when an op mixes devices, as CUDA would. Each case builds its model on
fake CUDA the way the real path does and runs it through: a training step of each stage's task on one
rank (no FSDP), the tower's evaluation, the stage-2 generation score, ``jobs/generate.py``'s path and the
export loaders.

Where fake tensors cannot follow a path by themselves, the audit helps them along and says where:

- data-dependent sizes and reads (boolean indexing, ``nonzero``, ``bincount``, ``.item()``, ``float()``,
  ``bool()``) get made-up values through the shape environment (``_HintedShapeEnv``): devices do not
  depend on values, and every branch taken still runs on fake tensors;
- ``.numpy()`` of a fake tensor (PIL images, scipy) gives zeros of its shape, after the check real
  tensors make: only a CPU tensor converts (``_numpy_of_fake_cpu_tensors``);
- a seeded ``torch.Generator`` must live on the device of the tensor it samples, which CUDA checks and
  fake tensors do not: ``_DeviceChecks`` makes that check (a CUDA generator cannot be made
  without a driver, so a CPU one has to be used by moving what it samples to the CPU);
- ``torch.equal`` answers False (after the device check);
- ``stack``/``cat`` of a CUDA tensor and a CPU scalar: fake tensors allow it, CUDA does not
  (``_DeviceChecks`` too);
- the autograd engine asks the driver for a CUDA device's context, so a backward pass over fake CUDA
  tensors cannot run here: ``_assert_backward_on`` checks the backward graph instead (every node
  receives gradients on the device, every trainable parameter is reached, and its gradient's
  accumulation is on the device), then the optimizer step runs on fake CUDA gradients;
- CUDA autocast refuses to start without a driver (it only changes dtypes, not devices).
"""

from __future__ import annotations

import logging
import importlib.util
import shutil
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.overrides import TorchFunctionMode

from orchestration.train.fsdp import checkpoint_blocks, promote_scalar_parameters, shard_model
from orchestration.train.metrics import WindowMetrics
from orchestration.train.optim import build_optimizer, build_scheduler, clip_grad_norm

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda")


class _HintedShapeEnv(ShapeEnv):
    """Every data-dependent size gets the value 1 and every data-dependent scalar 0.5, through the
    mechanism the shape environment has for real-tensor propagation: a branch on such a value takes one
    side (the other is another test's business) instead of raising."""

    def create_unbacked_symint(self, source=None):
        symbol = super().create_unbacked_symint(source)
        self.set_real_tensor_prop_unbacked_vals(symbol.node.expr, 1)
        return symbol

    def create_unbacked_symfloat(self):
        symbol = super().create_unbacked_symfloat()
        self.set_real_tensor_prop_unbacked_vals(symbol.node.expr, 0.5)
        return symbol

    def create_unbacked_symbool(self):
        symbol = super().create_unbacked_symbool()
        self.set_real_tensor_prop_unbacked_vals(symbol.node.expr, 1)
        return symbol


class _DeviceChecks(TorchFunctionMode):
    """Two checks of CUDA's that fake tensors skip: a generator must be on the device of what it
    samples, and ``stack``/``cat`` take tensors of one device (fake tensors let a CPU scalar join)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.equal:  # a data-dependent answer fake tensors refuse to make up (see above)
            if args[0].device != args[1].device:
                raise RuntimeError(f"equal: tensors on {args[0].device} and {args[1].device}")
            return False
        if func in (torch.stack, torch.cat, torch.concat) and args:
            devices = {t.device for t in args[0] if isinstance(t, torch.Tensor)}
            if len(devices) > 1:
                raise RuntimeError(f"{func.__name__}: tensors on {sorted(map(str, devices))}")
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device(kwargs.get("device") or "cpu")
            if generator.device.type != device.type:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: a {generator.device.type} generator "
                                   f"for {device.type} tensors")
        return func(*args, **kwargs)


def _fake_numpy(self, *, force: bool = False):
    if self.device.type != "cpu":
        raise TypeError(f"can't convert {self.device.type} device type tensor to numpy")
    shape = tuple(int(s) for s in self.shape)
    with unset_fake_temporarily():
        dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
    return np.zeros(shape, dtype=dtype)


@pytest.fixture()
def fake_cuda(monkeypatch):
    """Enter with ``with fake_cuda():``; real tensors met inside become fake (on their own device)."""
    logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)  # one line per hint
    monkeypatch.setattr(FakeTensor, "numpy", _fake_numpy, raising=False)

    @contextmanager
    def enter():
        mode = FakeTensorMode(shape_env=_HintedShapeEnv(), allow_non_fake_inputs=True)
        # Module.to() swaps a fake parameter for its moved copy, which a weak reference refuses: the
        # mode's memo of fake tensors holds them strongly instead (for the few seconds of a test).
        mode.fake_tensor_converter.meta_converter.tensor_memo = {}
        with mode, _DeviceChecks():
            yield

    return enter


def _on_cuda(module: torch.nn.Module) -> None:
    wrong = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type != "cuda"]
    assert not wrong, f"not on cuda: {wrong[:5]}"


def _build_one_rank(task, fake_cuda) -> torch.nn.Module:
    """``Trainer.build`` for one rank (no FSDP) on CUDA: the meta build and activation checkpointing run
    outside fake mode (``to_empty`` cannot swap out fake meta tensors), materialization and the task's
    initialization inside it."""
    with torch.device("meta"):
        model = task.build_model()
    lists = task.block_lists(model)
    for container in lists:
        checkpoint_blocks(container)
    promote_scalar_parameters(model)
    model = shard_model(model, [b for c in lists for b in c], None, None, task.ignored_params(model))
    with fake_cuda():
        model.to_empty(device=CUDA)
        task.init_weights(model, seed=0)
    _on_cuda(model)
    return model


def _assert_backward_on(loss: torch.Tensor, params: list[torch.nn.Parameter], device_type: str) -> None:
    """The backward graph of ``loss``: every node receives its gradients on ``device_type`` and every
    parameter in ``params`` is reached (its gradient accumulates on its own device)."""
    seen, stack, reached = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for meta in node._input_metadata:
            assert meta.device.type == device_type, f"{node.name()} receives gradients on {meta.device}"
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it writes .grad of
        if variable is not None:
            assert variable.device.type == device_type, f"a parameter on {variable.device}"
            reached.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    unreached = [i for i, p in enumerate(params) if id(p) not in reached]
    assert not unreached, f"{len(unreached)} trainable parameters get no gradient"


def _step(task, model, micro_batches: list[dict]) -> dict:
    """``Trainer.train_step``'s device work on one rank: forward per micro-batch, the backward graph,
    gradient clipping, the optimizer and scheduler step, and the log step's read of the window sums."""
    params = task.trainable_parameters(model)
    optimizer = build_optimizer(params, task.section.optim)
    scheduler = build_scheduler(optimizer, task.section.optim, task.section.steps)
    window = WindowMetrics()
    model.train()
    task.prepare_step(micro_batches)
    scalars = {}
    for batch in micro_batches:
        out = task.forward(model, batch, 0)
        _assert_backward_on(out["loss"], params, "cuda")
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                term = v.detach().float().reshape(())
                scalars[k] = scalars[k] + term if k in scalars else term
        task.count(batch)
    for p in params:  # what the backward pass would leave (see the module docstring)
        p.grad = torch.zeros_like(p)
    grad_norm = clip_grad_norm(params, task.section.optim.grad_clip)
    assert grad_norm.device.type == "cuda"
    bool(torch.isfinite(grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    assert states and all(t.device.type == "cuda" for t in states)
    scalars["grad_norm"] = grad_norm.detach().float()
    window.add_step(scalars, 1, 1)
    window.read()  # the log step stacks every scalar into one host copy
    return out


# ---------------------------------------------------------------- stage 1: the vision tower


@pytest.fixture()
def tower_task(tiny_config):
    from orchestration.train.tower import TowerTask

    config = tiny_config("cluster.use_gpu=true", "tower_train.activation_checkpointing=true", "tracking.enabled=false")
    return TowerTask(config)


def _tower_batch(task, n: int = 4) -> dict:
    """A decoded micro-batch as the data thread hands it over (``host_batch`` runs there, on the CPU)."""
    size = task.tower_cfg.image_size
    rng = np.random.default_rng(0)
    host = task.host_batch({"pixels": rng.integers(0, 255, (n, 3, size, size), dtype=np.uint8),
                            "caption": np.array(["a photo of a red circle"] * n)})
    return {k: torch.as_tensor(host[k]).to(dtype) for k, dtype in task.columns.items()}


def test_tower_training_step_on_cuda(tower_task, fake_cuda):
    model = _build_one_rank(tower_task, fake_cuda)
    batch = _tower_batch(tower_task)
    with fake_cuda():
        out = _step(tower_task, model, [{k: v.to(CUDA) for k, v in batch.items()}])
        _on_cuda(model)  # the EMA codebook update and dead-code restarts kept it there
    assert out["loss"].device.type == "cuda"


def test_tower_evaluation_on_cuda(tower_task, fake_cuda, monkeypatch):
    from orchestration.data import tower_data

    from vilau_model import evaluation

    split = tower_data.build_eval_split(tower_task.config)  # decoding and tokenization: CPU, data side
    monkeypatch.setattr(tower_data, "build_eval_split", lambda config: split)
    frechet = evaluation.frechet_distance

    def frechet_on_zeros(a, b):
        # torch.cov asks a data-dependent question inside (aten.equal) that fake tensors cannot answer;
        # the distance is CPU float64 work on copies: run it for real on zeros of the same shapes.
        assert a.device.type == b.device.type == "cpu"
        with unset_fake_temporarily():
            return frechet(torch.zeros(tuple(int(s) for s in a.shape), dtype=torch.float64),
                           torch.zeros(tuple(int(s) for s in b.shape), dtype=torch.float64))

    monkeypatch.setattr(evaluation, "frechet_distance", frechet_on_zeros)
    model = _build_one_rank(tower_task, fake_cuda)
    logged = []
    trainer = types.SimpleNamespace(model=model, device=CUDA, rank=0, world=1,
                                    logger=types.SimpleNamespace(log_image=lambda image, name: logged.append(name)))
    with fake_cuda():
        metrics = tower_task.evaluate(trainer, step=50)
    assert "eval/zero_shot_acc" in metrics and "eval/psnr" in metrics
    assert logged == ["reconstructions/step_0000050.png"]


# ---------------------------------------------------------------- stage 2: the unified LM


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from vilau_model.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("audit_tok")
    train_bpe_tokenizer(["a photo of a red circle in the top left", "a blue square moving right"] * 20, out,
                        vocab_size=300)
    return str(out)


@pytest.fixture()
def lm_task(tiny_config, tokenizer_dir):
    from orchestration.data.lm_data import directory_files
    from orchestration.train.lm import LMTask

    config = tiny_config("cluster.use_gpu=true", "lm_train.activation_checkpointing=true", "tracking.enabled=false")
    return LMTask(config, directory_files(tokenizer_dir))


def _lm_rows(model, rows: int = 2, length: int = 48) -> dict:
    """Packed rows (two samples a row, some visual positions) as the batch stream hands them over."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.special.vocab_size, (rows, length), generator=g)
    segments = torch.ones(rows, length, dtype=torch.long)
    segments[:, length // 2:] = 2
    positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).expand(rows, length)
    return {
        "input_ids": ids, "labels": ids.clone(),
        "codes": torch.randint(0, model.codebook_size, (rows, length, model.code_depth), generator=g),
        "is_visual": (torch.arange(length) % 3 == 0).expand(rows, length).clone(),
        "position_ids": positions.clone(), "segment_ids": segments,
    }


def test_lm_training_step_on_cuda(lm_task, fake_cuda):
    model = _build_one_rank(lm_task, fake_cuda)
    rows = [_lm_rows(model), _lm_rows(model)]  # two micro-batches (gradient accumulation)
    with fake_cuda():
        out = _step(lm_task, model, [{k: v.to(CUDA) for k, v in r.items()} for r in rows])
    assert out["loss"].device.type == "cuda"


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory, tokenizer_dir):
    """A stage-2 export of the tiny preset (random weights), written by ``save_lm_export``."""
    from orchestration.train.outputs import save_lm_export
    from vilau_model.config import get_lm_config, get_tower_config
    from vilau_model.tokenizer import SpecialIds, load_tokenizer
    from vilau_model.unified_lm import UnifiedLM
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = UnifiedLM(get_lm_config("tiny"), UnifiedVisionTower(get_tower_config("tiny")), SpecialIds.from_tokenizer(tokenizer))
    out = tmp_path_factory.mktemp("audit_export") / "export"
    save_lm_export(model, tokenizer, str(out))
    return str(out)


@pytest.fixture()
def files_read_for_real(monkeypatch):
    """The export's files are read with fake mode paused (a fake tensor cannot hold file contents);
    where the loader then puts the model, and everything after, runs on fake tensors. Returns the
    models read, in order."""
    from orchestration.train import outputs

    read, models = outputs.read_lm_export, []

    def read_outside_fake_mode(directory):
        with unset_fake_temporarily():
            models.append(read(directory))
        return models[-1]

    monkeypatch.setattr(outputs, "read_lm_export", read_outside_fake_mode)
    return models


def test_export_loader_puts_every_tensor_on_the_device(lm_export, fake_cuda, files_read_for_real):
    """Every tensor the loaded model uses moves with it: a forward and text generation run on CUDA."""
    from orchestration.train.outputs import load_lm_export

    with fake_cuda():
        model, tokenizer = load_lm_export(lm_export, device="cuda")
        _on_cuda(model)
        rows = {k: v.to(CUDA) for k, v in _lm_rows(model).items()}
        assert model(**rows)["loss"].device.type == "cuda"
        model.generate_text([tokenizer.encode("a photo of")], max_new_tokens=2,
                            temperature=1.0, generator=torch.Generator().manual_seed(0))


def test_generation_score_on_cuda(lm_export, fake_cuda, files_read_for_real):
    from orchestration.train.outputs import load_lm_export
    from orchestration.train.samples import generation_score

    with fake_cuda():
        model, tokenizer = load_lm_export(lm_export)
        model.to(CUDA)  # as run_generation_eval places it
        result = generation_score(model, tokenizer, ["red circle", "blue square"], per_class=1)
    assert result["images"].shape[0] == 2 and result["predicted"].device.type == "cpu"


def test_understanding_score_on_cuda(lm_export, fake_cuda, files_read_for_real):
    from orchestration.train.outputs import load_lm_export
    from orchestration.train.samples import understanding_score

    with fake_cuda():
        model, tokenizer = load_lm_export(lm_export)
        model.to(CUDA)  # as run_generation_eval places it
        size = model.tower.config.image_size
        pixels = np.zeros((2, 3, size, size), np.uint8)  # uint8 CPU arrays, as build_eval_split gives them
        result = understanding_score(model, tokenizer, pixels, [0, 1], ["red circle", "blue square"])
    assert len(result["answers"]) == 2 and result["class_chance"] == 0.5


def test_generate_job_runs_on_cuda(lm_export, fake_cuda, files_read_for_real, tmp_path):
    """jobs/generate.py's path with ``--device cuda`` (what ``auto`` picks where there is a GPU, below),
    the export found from the config's run: the model goes to CUDA and the whole generation runs there."""
    spec = importlib.util.spec_from_file_location("generate_job", Path(__file__).resolve().parents[1] / "jobs" / "generate.py")
    generate_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_job)
    out = tmp_path / "generated"
    shutil.copytree(lm_export, tmp_path / "runs" / "audit-lm" / "export")  # where the config's run leaves it
    with fake_cuda():
        generate_job.main(["--prompt", "a red circle", "--out", str(out), "--device", "cuda", "--num-samples", "2",
                           f"cluster.storage_path={tmp_path / 'runs'}", "run_name=audit"])
    assert sorted(p.name for p in (out / "gen-0001").iterdir()) == ["prompt00_sample00.png", "prompt00_sample01.png", "prompts.txt"]
    _on_cuda(files_read_for_real[0][0])


def test_generate_device_auto_picks_a_gpu_when_there_is_one(monkeypatch):
    from orchestration.train.generation import generation_device

    assert generation_device("cpu") == torch.device("cpu")
    assert generation_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generation_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert generation_device("auto") == torch.device("cuda")
    assert generation_device() == torch.device("cuda")


# ---------------------------------------------------------------- the audit's own checks


def test_the_audit_catches_mixed_devices_and_misplaced_generators(fake_cuda):
    with fake_cuda():
        x = torch.ones(3, device=CUDA)
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="cpu generator for cuda"):
            torch.multinomial(x.softmax(0), 1, generator=torch.Generator())
        with pytest.raises(RuntimeError, match="stack: tensors on"):
            torch.stack([x.sum(), torch.tensor(1.0)])
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        layer = torch.nn.Linear(3, 3, device=CUDA)
        cpu_path = layer(x).cpu().sum() * 2  # a gradient that crosses to the CPU
        with pytest.raises(AssertionError, match="receives gradients on cpu"):
            _assert_backward_on(cpu_path, list(layer.parameters()), "cuda")
        with pytest.raises(AssertionError, match="get no gradient"):
            _assert_backward_on(layer.bias.sum(), list(layer.parameters()), "cuda")
