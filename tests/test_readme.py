"""Every example of the README runs: its Python blocks (in order, sharing one namespace, the way a reader
would paste them) and its `fxsparse ...` command lines.

Stand-ins replace what a reader supplies: `loader`, `images`, the data splits, pretrained weights (timm and
torchvision models are built with random init, and small: 32 x 32 inputs where the README says 224), and
`my_attack`. A block preceded by `<!-- readme: compile-only (reason) -->` needs what the suite does not have
(several GPUs, `torchrun`, ImageNet on disk): it is compiled, not run. Lines `name = ...` (a literal Ellipsis)
are the reader's own data and take the stand-in of that name.
"""
import contextlib
import pathlib
import re
import shlex

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(?:<!-- readme: (?P<mark>[\w-]+)[^>]*-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def blocks(lang):
    return [(m.group("mark"), m.group("code"), README[: m.start()].count("\n") + 1)
            for m in FENCE.finditer(README) if m.group("lang") == lang]


def section_of(line: int) -> str:
    """The `## ` heading a README line is under."""
    heading = ""
    for number, text in enumerate(README.splitlines()[:line], 1):
        if text.startswith("## "):
            heading = text[3:].strip()
    return heading


def test_the_readme_has_examples_and_marks_are_known():
    assert len(blocks("python")) >= 8 and len(blocks("bash")) >= 4
    assert {mark for lang in ("python", "bash") for mark, _, _ in blocks(lang)} <= {None, "compile-only", "skip"}


def _standins(size=32, n=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (n,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    return {"loader": loader, "train_loader": loader, "val_loader": [(x[:4], y[:4])],
            "test_loader": [(x[4:], y[4:])], "images": x[:2], "labels": y[:2],
            "my_attack": lambda model, images, labels: images.clone()}


@contextlib.contextmanager
def _small_models(monkeypatch, size=32):
    """timm / torchvision models with random weights (timm's tiny test model of the same family where there
    is one); README sizes of 224 become `size`."""
    import timm
    import torchvision

    create = timm.create_model
    tiny = {"convnext": "test_convnext", "vit": "test_vit", "resnet": "test_resnet", "efficientnet": "test_efficientnet"}

    def small_timm(name, pretrained=False, **kwargs):  # timm's own test models of the same family
        family = next((v for k, v in tiny.items() if name.startswith(k)), name)
        return create(family, pretrained=False, **kwargs)

    get = torchvision.models.get_model
    monkeypatch.setattr(timm, "create_model", small_timm)
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: get(name, weights=None))
    yield


def _source(code: str, size=32) -> str:
    """The block as run here: `name = ...` lines dropped (the stand-in is used), 224 x 224 inputs shrunk."""
    lines = [line for line in code.splitlines() if not re.match(r"^\s*\w+\s*=\s*\.\.\.(\s|#|$)", line)]
    return re.sub(r"\b224, 224\b", f"{size}, {size}", "\n".join(lines))


@pytest.mark.slow
def test_python_blocks_run_in_order(monkeypatch, tmp_path):
    """Blocks run in order within their section, the way a reader follows one section; every section starts
    from what the quick start defined (`model`, `gm`, ...) and fresh stand-ins, so that one section's names
    (a detector called `model` in "Any model") do not leak into the next."""
    monkeypatch.chdir(tmp_path)
    base = dict(_standins())
    namespaces = {}
    with _small_models(monkeypatch):
        for mark, code, line in blocks("python"):
            source = _source(code)
            compiled = compile(source, f"README.md:{line}", "exec")
            if mark in ("compile-only", "skip"):
                continue
            section = section_of(line)
            namespace = base if section == "Quick start" else namespaces.setdefault(
                section, {**base, **_standins()})
            try:
                exec(compiled, namespace)
            except Exception as exc:  # name the block
                raise AssertionError(f"README block at line {line} ({section}) failed: {type(exc).__name__}: "
                                     f"{exc}") from exc


def _commands():
    out = []
    for mark, code, line in blocks("bash"):
        if mark in ("compile-only", "skip"):
            continue
        for raw in code.splitlines():
            command = raw.split("#", 1)[0].strip()
            # `demo` and `evaluate` train and attack for minutes: tests/test_cli_demo.py and
            # tests/test_cli_evaluate.py run them with small budgets
            if command.startswith(("fxsparse ", "python -m fxsparse ")) and not re.search(r"fxsparse (demo|evaluate)\b",
                                                                                           command):
                out.append((command, line))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command,line", _commands(), ids=[c for c, _ in _commands()])
def test_fxsparse_command_lines_run(command, line, capsys):
    from fxsparse.tools.cli import main

    args = shlex.split(command)
    args = args[3:] if args[0] == "python" else args[1:]
    assert main(args) == 0, f"README line {line}: {command}\n{capsys.readouterr().err}"
