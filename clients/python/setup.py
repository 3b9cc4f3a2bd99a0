"""Builds berth-client: the stubs (`berth.v1.*_pb2*`) are generated from the
repository's `proto/` at build time with grpcio-tools; nothing generated is
committed. Set BERTH_PROTO_DIR to build from protos elsewhere."""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTOS = [
    "berth/v1/sessions.proto",
    "berth/v1/agents.proto",
    "berth/v1/nodes.proto",
    "berth/v1/access.proto",
    "berth/v1/schedules.proto",
    "berth/v1/webhooks.proto",
    "berth/v1/audit.proto",
]


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    src = Path(os.environ.get("BERTH_PROTO_DIR", HERE.parent.parent / "proto" / "proto"))
    missing = [p for p in PROTOS if not (src / p).is_file()]
    if missing:
        raise SystemExit(f"berth-client: no protos at {src} ({', '.join(missing)}); set BERTH_PROTO_DIR")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out / "berth" / "v1").mkdir(parents=True, exist_ok=True)
    (out / "berth" / "v1" / "__init__.py").write_text('"""Generated from proto/berth/v1 at build time."""\n')
    args = ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("berth-client: protoc failed on " + " ".join(PROTOS))


class BuildPy(build_py):
    def run(self):
        super().run()
        generate(Path(self.build_lib))


def dependencies() -> list:
    """The runtime the generated stubs need: grpcio no older than the
    grpcio-tools that generates them (the stubs check it at import)."""
    from importlib.metadata import version

    tools = version("grpcio-tools")
    return [f"grpcio>={tools}", "grpcio-status>=1.70", "protobuf>=5.29"]


setup(cmdclass={"build_py": BuildPy}, install_requires=dependencies())
