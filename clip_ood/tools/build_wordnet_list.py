"""Build clip_ood/data/wordnet_words.txt.gz from WordNet 3.0 database files (Debian: apt-get install wordnet-base).

Output: gzip'd UTF-8 text, one section per lexicographer file: a line ``#lexname`` then one word a line (nouns and
adjectives only; every lemma of every synset, underscores turned into spaces, adjective position markers such as
``(a)`` removed; unique within a section, in synset order). The WordNet 3.0 licence (the header of the data files)
is written next to it as ``LICENSE-WordNet``.

    python -m clip_ood.tools.build_wordnet_list [--wordnet-dir /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
from pathlib import Path

from vision.io import write_bytes_atomic, write_text_atomic

# lex_filenum -> lexicographer file name (WordNet lexnames(5WN)); only nouns and adjectives are used
LEXNAMES: dict[int, str] = {
    0: "adj.all", 1: "adj.pert", 3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
    12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive",
    17: "noun.object", 18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession",
    22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time", 44: "adj.ppl",
}
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
OUT_NAME = "wordnet_words.txt.gz"
LICENSE_NAME = "LICENSE-WordNet"
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def parse_data_file(path: Path) -> list[tuple[str, str]]:
    """(lexname, word) pairs of a WordNet ``data.noun`` / ``data.adj`` file, in synset order."""
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # licence header
                continue
            parts = line.split(" ")
            try:
                lexname = LEXNAMES[int(parts[1])]
                w_cnt = int(parts[3], 16)
                words = parts[4 : 4 + 2 * w_cnt : 2]
            except (IndexError, KeyError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a WordNet data line ({e})") from e
            for w in words:
                w = _ADJ_MARKER.sub("", w).replace("_", " ").strip()
                if w:
                    pairs.append((lexname, w))
    return pairs


def build(wordnet_dir: Path, out_dir: Path = DATA_DIR) -> Path:
    """Write the compressed word list and the licence file; return the list's path."""
    sections: dict[str, dict[str, None]] = {}
    for name in ("data.noun", "data.adj"):
        for lexname, word in parse_data_file(wordnet_dir / name):
            sections.setdefault(lexname, {})[word] = None
    lines: list[str] = []
    for lexname in sorted(sections):
        lines.append("#" + lexname)
        lines.extend(sections[lexname])
    out = out_dir / OUT_NAME
    buf = io.BytesIO()
    # mtime=0 keeps the file byte-identical between builds
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    write_bytes_atomic(out, buf.getvalue())
    write_text_atomic(out_dir / LICENSE_NAME, read_license(wordnet_dir / "data.noun"))
    return out


def read_license(data_file: Path) -> str:
    """The WordNet licence text that heads every data file (lines starting with two spaces and a number)."""
    text: list[str] = []
    with open(data_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("  "):
                break
            text.append(re.sub(r"^\s+\d+ ?", "", line).rstrip())
    return "WordNet 3.0 licence (the word list wordnet_words.txt.gz is derived from WordNet 3.0)\n\n" + "\n".join(text) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--out-dir", type=Path, default=DATA_DIR)
    a = p.parse_args()
    out = build(a.wordnet_dir, a.out_dir)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
