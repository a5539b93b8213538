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


def test_one_list_reader_for_every_command(tmp_path):
    """vision.io.read_image_list: absolute or relative paths, spaces in paths, a TAB label or OpenOOD's integer
    label, BOM, CRLF, comments; a line with a label and no path is named with its line number. `ood score` reads
    lists through it (clip_ood.data.list_images), so a listed `fashion/ankle boot/0001.png` stays whole."""
    from clip_ood.data import list_images as ood_list_images
    from vision.io import ListEntry, read_image_list

    lst = tmp_path / "list.txt"
    text = ("\ufefffashion/ankle boot/0001.png\r\n# comment\r\n\r\nood/x 1.png\t7\r\nopenood/cat.jpg 3\r\n"
            f"{tmp_path / 'abs.png'}\r\nnot a label 3\r\n")
    lst.write_bytes(text.encode("utf-8"))
    assert read_image_list(lst) == [
        ListEntry(tmp_path / "fashion" / "ankle boot" / "0001.png", None, 1),
        ListEntry(tmp_path / "ood" / "x 1.png", "7", 4),
        ListEntry(tmp_path / "openood" / "cat.jpg", "3", 5),
        ListEntry(tmp_path / "abs.png", None, 6),
        ListEntry(tmp_path / "not a label 3", None, 7),  # no file extension before the number: all path
    ]
    root = tmp_path / "data"
    assert ood_list_images(lst, data_root=root)[0] == root / "fashion" / "ankle boot" / "0001.png"
    assert ood_list_images(lst, data_root=root)[3] == tmp_path / "abs.png"  # absolute paths are taken as they are
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png\n\t3\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: no image path before the label '3'"):
        read_image_list(bad)
