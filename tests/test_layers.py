"""The layer contract (`[tool.importlinter]` in pyproject.toml) places every module of msgan/: a new module
outside every layer would escape the contract silently, so this test names it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    out = []
    for path in sorted((ROOT / "msgan").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            continue  # a package is placed by its modules
        out.append(".".join(parts))
    return out


def test_every_module_of_msgan_is_placed_in_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    missing = [m for m in _modules() if not any(m == p or m.startswith(p + ".") for p in placed)]
    assert not missing, f"modules in no layer of the import-linter contract: {missing}"
    assert len(_modules()) > 40
