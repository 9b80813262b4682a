"""gan/ is a pure PyTorch library: it must never import ray, mlflow or boto3."""

import ast
import subprocess
import sys
from pathlib import Path

import gan

FORBIDDEN = {"ray", "mlflow", "boto3", "botocore", "pipelines"}
GAN_DIR = Path(gan.__file__).parent


def test_no_forbidden_import_statements_in_gan():
    offenders = []
    for path in GAN_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in FORBIDDEN]
            offenders += [f"{path}:{node.lineno} {n}" for n in bad]
    assert not offenders, offenders


def test_importing_every_gan_module_loads_none_of_them():
    modules = sorted(
        ".".join(p.relative_to(GAN_DIR.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in GAN_DIR.rglob("*.py")
    )
    assert "gan.nn.sync_batchnorm" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
