"""The committed generated modules match protos/ and import without JAX."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "har_flax" / "proto"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_regenerated_code_equals_committed(tmp_path):
    out = tmp_path / "proto"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    fresh, committed = _tree(out), _tree(COMMITTED)
    assert fresh.keys() == committed.keys(), (
        "generated file set differs; run `python scripts/gen_protos.py` and commit the result"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}; run `python scripts/gen_protos.py`"
    assert not filecmp.dircmp(out, COMMITTED).diff_files


def test_generated_modules_import_without_jax():
    code = (
        "import sys\n"
        "from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc\n"
        "req = har_pb2.PredictRequest(images=[b'x'], top_k=3)\n"
        "assert har_pb2.PredictRequest.FromString(req.SerializeToString()) == req\n"
        "assert hasattr(har_pb2_grpc, 'ActionRecognitionStub')\n"
        "assert 'jax' not in sys.modules, 'importing the protos pulled in JAX'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_contract_names_are_stable():
    """The names clients (webui, Node, grpcurl users) depend on."""
    from har_flax.proto.har.v1 import har_pb2

    service = har_pb2.DESCRIPTOR.services_by_name["ActionRecognition"]
    assert service.full_name == "har.v1.ActionRecognition"
    assert [m.name for m in service.methods] == ["Health", "Classes", "Predict"]
    fields = {
        "PredictRequest": ["images", "top_k"],
        "PredictResponse": [
            "action", "confidence", "all_predictions", "model", "latency_ms", "num_frames"
        ],
        "Prediction": ["action", "confidence"],
    }  # fmt: skip
    for message, names in fields.items():
        assert [f.name for f in har_pb2.DESCRIPTOR.message_types_by_name[message].fields] == names


def test_reflection_serves_the_generated_descriptors_plus_comments():
    """descriptors.binpb, as served by reflection, is the generated module's descriptor with the
    .proto's comments added: no field, name or JSON name differs."""
    from google.protobuf import descriptor_pb2

    from grpc_server.reflection import documented_files
    from har_flax.proto.har.v1 import har_pb2

    served = descriptor_pb2.FileDescriptorProto.FromString(documented_files()["har/v1/har.proto"])
    comments = {loc.leading_comments.strip() for loc in served.source_code_info.location}
    assert "Classifies one still image or one sequence of frames." in " ".join(comments)
    generated = descriptor_pb2.FileDescriptorProto()
    har_pb2.DESCRIPTOR.CopyToProto(generated)
    served.ClearField("source_code_info")
    assert served == generated
