"""Builds berth-client: the stubs (`berth.v1.*_pb2*`) are generated from the
repository's `proto/` (or, in an sdist, its copy under `proto/`) at build
time with grpcio-tools; nothing generated is committed. Set BERTH_PROTO_DIR
to build from protos elsewhere."""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

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

    src = Path(os.environ.get("BERTH_PROTO_DIR") or next(
        (d for d in (HERE / "proto", HERE.parent.parent / "proto" / "proto") if (d / PROTOS[0]).is_file()),
        HERE / "proto",
    ))
    missing = [p for p in PROTOS if not (src / p).is_file()]
    if missing:
        raise SystemExit(f"berth-client: no protos at {src} ({', '.join(missing)}); set BERTH_PROTO_DIR")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out / "berth" / "v1").mkdir(parents=True, exist_ok=True)
    (out / "berth" / "v1" / "__init__.py").write_text('"""Generated from proto/berth/v1 at build time."""\n')
    args = ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("berth-client: protoc failed on " + " ".join(PROTOS))


class Sdist(sdist):
    """The sdist carries the protos (under `proto/`), so a wheel builds from
    it alone."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        src = Path(os.environ.get("BERTH_PROTO_DIR", HERE.parent.parent / "proto" / "proto"))
        for rel in PROTOS + ["google/api/annotations.proto", "google/api/http.proto"]:
            target = Path(base_dir) / "proto" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)


class BuildPy(build_py):
    def run(self):
        super().run()
        generate(Path(self.build_lib))


def dependencies() -> list:
    """The runtime the generated stubs need: grpcio no older than the
    grpcio-tools that generates them (the stubs check it at import)."""
    from importlib.metadata import version

    tools = version("grpcio-tools")
    # googleapis-common-protos: the `google.api` annotations the protos import.
    return [f"grpcio>={tools}", "grpcio-status>=1.70", "protobuf>=5.29", "googleapis-common-protos>=1.63"]


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist}, install_requires=dependencies())
