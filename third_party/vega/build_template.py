"""Build ``.dvc/plots/offline.html``: DVC's plots page with vega, vega-lite and vega-embed inlined.

``dvc plots show`` / ``dvc plots diff`` load these three libraries from a CDN by default, so on an
offline or hospital network the charts stay blank. This template carries them inside the page
(``.dvc/config``: ``plots.html_template = plots/offline.html``). Run it by hand to change the
versions (it needs npm and the npm registry); the tarballs are checked against the digests below.

    python third_party/vega/build_template.py
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parents[1] / ".dvc" / "plots" / "offline.html"
# package, version, sha256 of its npm tarball, the bundle inside it
PACKAGES = [
    ("vega", "5.33.1", "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3", "build/vega.min.js"),
    ("vega-lite", "5.23.0", "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da", "build/vega-lite.min.js"),
    ("vega-embed", "6.29.0", "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1", "build/vega-embed.min.js"),
]
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>hemaflow plots</title>
    <!-- vega, vega-lite and vega-embed are inlined (BSD-3-Clause, licences in third_party/vega/):
         the charts draw without any network. Built by third_party/vega/build_template.py. -->
{scripts_inline}
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def _bundle(workdir: Path, name: str, version: str, digest: str, member: str) -> str:
    packed = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--silent"], cwd=workdir, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    tarball = workdir / packed
    actual = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if actual != digest:
        raise SystemExit(f"{packed}: sha256 {actual}, expected {digest}")
    with tarfile.open(tarball) as archive:
        return archive.extractfile(f"package/{member}").read().decode()


def main() -> None:
    scripts = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, version, digest, member in PACKAGES:
            code = _bundle(Path(workdir), name, version, digest, member).replace("</script", "<\\/script")
            scripts.append(f"    <!-- {name}@{version} ({member}) -->\n    <script>{code}</script>")
    page = PAGE.replace("{scripts_inline}", "\n".join(scripts))
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(page)
    print(f"{TEMPLATE}: {TEMPLATE.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
