"""Supply the BPE vocabulary the hpsv2 1.2.0 wheel lacks, from the open_clip_torch wheel.

Usage: python install_hpsv2_vocab.py REFERENCE_DIR OPEN_CLIP_WHEEL
"""

import sys
import zipfile
from pathlib import Path

VOCAB = "bpe_simple_vocab_16e6.txt.gz"

reference, wheel = Path(sys.argv[1]), sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    data = archive.read(f"open_clip/{VOCAB}")
(reference / "hpsv2" / "src" / "open_clip" / VOCAB).write_bytes(data)
print(f"wrote {reference / 'hpsv2' / 'src' / 'open_clip' / VOCAB}")
