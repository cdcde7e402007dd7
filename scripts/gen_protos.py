"""Generates the committed Python gRPC modules in har_flax/proto/ from protos/ (grpcio-tools),
and descriptors.binpb there: the descriptors with their comments, which server reflection serves.

The one way to regenerate: `python scripts/gen_protos.py` (or `make protos`). A test regenerates
into a temporary folder and fails on any difference with the committed files.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
DEFAULT_OUT = REPO / "har_flax" / "proto"
# Generated modules live under this package, so `import har.v1` in generated code must become
# `import har_flax.proto.har.v1`: protoc writes imports relative to the proto root.
PACKAGE = "har_flax.proto"

ROOT_INIT = '''"""Generated protobuf and gRPC modules for the har.v1 API (protos/har/v1/har.proto).

Do not edit: regenerate with `python scripts/gen_protos.py`. Importing this package pulls in only
protobuf and grpcio (never JAX), so the web UI and other clients can use it on machines without
the model:

    from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc
"""
'''
# Every .proto's FileDescriptorProto with source info (comments), as a FileDescriptorSet.
DESCRIPTOR_SET = "descriptors.binpb"
SUB_INIT = '"""Generated package (see har_flax/proto/__init__.py)."""\n'


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """All .proto files under `root`, sorted, as paths relative to it."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def _rewrite_imports(text: str, top_packages: set[str]) -> str:
    """Prefixes absolute imports of generated modules (`from har.v1 import x`) with PACKAGE."""
    alternatives = "|".join(sorted(re.escape(p) for p in top_packages))
    text = re.sub(rf"^from ({alternatives})(\.| )", rf"from {PACKAGE}.\1\2", text, flags=re.M)
    return re.sub(rf"^import ({alternatives})\.", rf"import {PACKAGE}.\1.", text, flags=re.M)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc (python, pyi and grpc plugins) and writes a clean package tree to `out_dir`.

    Args:
      out_dir: the package folder to (re)create; existing generated files there are replaced.
      proto_root: the import root holding the .proto sources.

    Returns:
      The written files, relative to `out_dir`, sorted.

    Raises:
      RuntimeError: protoc reported an error (its message is included).
    """
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        raise RuntimeError(f"no .proto files under {proto_root}")
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            # The descriptors with their comments, for server reflection: the generated
            # modules' descriptors have none, so `grpcurl describe` would show bare fields.
            f"--descriptor_set_out={Path(tmp) / DESCRIPTOR_SET}",
            "--include_source_info",
            *[str(f) for f in files],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        tmp_path = Path(tmp)
        top_packages = {f.parts[0] for f in files}
        # Replace only what we generate, so a stray editor file does not survive regeneration
        # unnoticed while the package's own __init__ is rewritten below.
        for top in top_packages:
            shutil.rmtree(out_dir / top, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted([*tmp_path.rglob("*.py*"), tmp_path / DESCRIPTOR_SET]):
            rel = src.relative_to(tmp_path)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".binpb":
                dst.write_bytes(src.read_bytes())
            else:
                dst.write_text(_rewrite_imports(src.read_text(), top_packages))
            written.append(rel)
        (out_dir / "__init__.py").write_text(ROOT_INIT)
        written.append(Path("__init__.py"))
        for rel in list(written):
            for parent in rel.parents:
                if parent != Path(".") and not (out_dir / parent / "__init__.py").exists():
                    (out_dir / parent / "__init__.py").write_text(SUB_INIT)
                    written.append(parent / "__init__.py")
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="package folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    for rel in generate(args.out):
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
