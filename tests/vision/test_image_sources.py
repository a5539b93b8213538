"""vision.io.list_images: a folder, one image, or a .txt list of image paths (the ultralytics `source=list.txt`)."""

import pytest
from PIL import Image

from vision.io import list_images


def test_txt_list_relative_absolute_comments_and_missing_entries(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "2.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    lst = tmp_path / "list.txt"
    lst.write_text(f"\ufeffa/1.png\n\n# a comment\n{tmp_path / '2.png'}\n  missing.png  \n", encoding="utf-8")
    # a missing entry is kept: reading it names the file (or --skip-bad skips it)
    assert list_images(lst) == [tmp_path / "a" / "1.png", tmp_path / "2.png", tmp_path / "missing.png"]
    assert list_images(tmp_path / "a") == [tmp_path / "a" / "1.png"]
    assert list_images(tmp_path / "2.png") == [tmp_path / "2.png"]


def test_txt_list_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(FileNotFoundError, match="empty.txt' names no image"):
        list_images(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe1.png\n")
    with pytest.raises(ValueError, match="bad.txt: image list is not UTF-8"):
        list_images(bad)
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        list_images(tmp_path / "nope")
