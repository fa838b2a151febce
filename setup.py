"""Build hook: the protobuf code (package `yindian.v1`) is generated from
protos/ by grpc_tools.protoc while the package is built, never committed.

Everything else about the package is in pyproject.toml."""
from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"


def generate_protos(out_dir: Path) -> list[Path]:
    """protoc every protos/yindian/v1/*.proto into out_dir/yindian/v1 (with
    type stubs); returns the files written."""
    from grpc_tools import protoc  # a build requirement (pyproject [build-system])

    protos = sorted(PROTO_ROOT.glob("yindian/v1/*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    (out_dir / "yindian" / "v1").mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + " ".join(p.name for p in protos))
    for init in (out_dir / "yindian" / "__init__.py", out_dir / "yindian" / "v1" / "__init__.py"):
        init.touch()
    return sorted((out_dir / "yindian").rglob("*.py*"))


class BuildPyWithProtos(build_py):
    """build_py that also writes the generated `yindian.v1` modules into the
    build tree (a wheel), or into the checkout for an editable install."""

    def run(self) -> None:
        super().run()
        target = ROOT if self.editable_mode else Path(self.build_lib)
        generate_protos(target)


setup(cmdclass={"build_py": BuildPyWithProtos})
