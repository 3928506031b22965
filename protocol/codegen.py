"""Generate the Python protobuf and gRPC stubs from ``v1/joint_env.proto``.

The stubs are committed, so installing fedcomm needs no protoc step; this module regenerates
them after an edit of the ``.proto`` (``python -m fedcomm.protocol.codegen``), and the test suite
checks that the committed stubs are what it generates. It needs ``grpcio-tools`` (dev extra).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "v1" / "joint_env.proto"
# Imports inside the generated code follow the proto's path: map this folder to the package.
PACKAGE_PATH = "fedcomm/protocol"
GENERATED = ("joint_env_pb2.py", "joint_env_pb2.pyi", "joint_env_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated stubs into ``out_dir`` and return their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PACKAGE_PATH}={HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{PACKAGE_PATH}/v1/{PROTO.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / PACKAGE_PATH / "v1" / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(HERE / "v1"):
        print(f"wrote {path}", file=sys.stderr)
