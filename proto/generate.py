"""Generate the Python modules and type stubs of the stockward contract.

`python proto/generate.py` writes them beside the .proto files; `--check` writes them to a
scratch folder instead and exits 1 when the committed ones differ, so that `make test`
fails on a contract changed without `make proto`.
"""

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
CONTRACT_DIR = PROTO_ROOT / "stockward" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def include_dirs() -> list[Path]:
    """Where protoc finds google/protobuf and google/rpc imports."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    google_rpc = next(
        Path(entry) / "google" / "rpc"
        for entry in sys.path
        if (Path(entry) / "google" / "rpc" / "status.proto").is_file()
    )
    return [PROTO_ROOT, well_known, google_rpc.parent.parent]


def generate(out_dir: Path) -> None:
    sources = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in CONTRACT_DIR.glob("*.proto")
    )
    args = ["protoc", *(f"-I{d}" for d in include_dirs())]
    for flag in ("python_out", "grpc_python_out", "mypy_out", "mypy_grpc_out"):
        args.append(f"--{flag}={out_dir}")
    # The mypy plugins live beside the interpreter; protoc looks for them on PATH.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")


def stale_files(scratch: Path) -> list[str]:
    fresh = {p.name for p in (scratch / "stockward" / "v1").iterdir()}
    committed = {
        p.name for p in CONTRACT_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }
    stale = sorted(fresh ^ committed)
    for name in sorted(fresh & committed):
        if not filecmp.cmp(
            scratch / "stockward" / "v1" / name, CONTRACT_DIR / name, shallow=False
        ):
            stale.append(name)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if generated code is stale"
    )
    if not parser.parse_args().check:
        generate(PROTO_ROOT)
        return

    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        stale = stale_files(Path(scratch))
    if stale:
        print("generated code is stale, run `make proto`: " + ", ".join(stale))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
