"""A fake `uv pip install --target` tree: dist-info with METADATA and RECORD, a script."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_dist(
    target: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    *,
    scripts: dict[str, bytes] | None = None,
    requested: bool = False,
) -> None:
    """Write one installed distribution into ``target`` as an installer would."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n".encode()
    )
    contents[f"{info}/INSTALLER"] = b"uv"
    if requested:
        contents[f"{info}/REQUESTED"] = b""
    for script, data in (scripts or {}).items():
        contents[f"bin/{script}"] = data
    rows = []
    for relative, data in sorted(contents.items()):
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if relative.startswith("bin/"):
            path.chmod(0o755)
        rows.append(f"{relative},{_hash(data)},{len(data)}")
    rows.append(f"{info}/RECORD,,")
    (target / info / "RECORD").write_text("\n".join(rows) + "\n")
