"""taiyi.data: image-text pairs from folders, CSV, JSONL and WebDataset tar shards; every broken sample counted."""

from __future__ import annotations

import io
import json
import logging
import pickle
import struct
import tarfile
import threading
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.data import IndexedPairs, Pair, PairSource, SkipCounter, collate_pairs, expand_braces, open_pairs
from taiyi.errors import InvalidInputError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ---------------------------------------------------------------------------------------------------- fixtures


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png(color=RED, size=(8, 8), mode="RGB") -> bytes:
    return encode(Image.new(mode, size, color))


def noisy_jpeg(seed: int = 0, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``: cheap bomb."""
    data = bytearray(png(size=(1, 1)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def write_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pixel(pair: Pair, xy=(0, 0)) -> tuple[int, ...]:
    return pair.image.getpixel(xy)


@pytest.fixture
def taiyi_log(caplog):
    """caplog receiving INFO from ``taiyi``, whatever an earlier in-process CLI test did to that logger."""
    logger = logging.getLogger("taiyi")
    saved = logger.propagate, logger.level
    logger.propagate = True
    logger.setLevel(logging.INFO)
    caplog.set_level(logging.INFO, logger="taiyi")
    yield caplog
    logger.propagate, logger.level = saved


@pytest.fixture
def folder(tmp_path):
    """Three good pairs at several depths, an image without caption, a caption without image."""
    root = tmp_path / "pairs"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.jpg").write_bytes(encode(Image.new("RGB", (8, 8), RED), "JPEG"))
    (root / "a.txt").write_text("  一只红色的猫 \n", encoding="utf-8")
    (root / "b" / "c.png").write_bytes(png(GREEN))
    (root / "b" / "c.txt").write_text("第一行\n\n  第二行  \n", encoding="utf-8")
    (root / "b" / "deep" / "d.webp").write_bytes(encode(Image.new("RGB", (8, 8), BLUE), "WEBP", lossless=True))
    (root / "b" / "deep" / "d.txt").write_text("蓝色", encoding="utf-8")
    (root / "lonely.png").write_bytes(png())
    (root / "orphan.txt").write_text("没有图片", encoding="utf-8")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(png())
    return root


# ---------------------------------------------------------------------------------------------------- layouts


def test_folder_pairs_sorted_at_any_depth(folder, taiyi_log):
    source = open_pairs(folder)
    assert isinstance(source, torch.utils.data.IterableDataset) and source.kind == "folder"
    assert source.keys() == ["a.jpg", "b/c.png", "b/deep/d.webp", "lonely.png"]  # orphan caption ignored
    assert len(source) == 4
    pairs = list(source)
    assert [p.key for p in pairs] == ["a.jpg", "b/c.png", "b/deep/d.webp"]
    assert [p.caption for p in pairs] == ["一只红色的猫", "第一行 第二行", "蓝色"]
    assert all(p.image.mode == "RGB" and p.image.size == (8, 8) for p in pairs)
    assert np.allclose(pixel(pairs[0]), RED, atol=3)  # JPEG
    assert pixel(pairs[1]) == GREEN and pixel(pairs[2]) == BLUE
    assert source.skips.as_dict() == {"missing caption": 1}
    assert f"{folder}: read 3 pairs; skipped 1 sample: 1 missing caption" in taiyi_log.messages


def test_csv_with_taiyi_columns_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(png(RED))
    (tmp_path / "imgs" / "2.png").write_bytes(png(GREEN))
    absolute = tmp_path / "abs.png"
    absolute.write_bytes(png(BLUE))
    sub = tmp_path / "meta"
    sub.mkdir()
    # Paths are relative to the CSV's own folder; a caption may hold commas, quotes and newlines.
    (sub / "train.csv").write_text(
        'name,caption\n../imgs/1.png,"红色,方块"\n../imgs/2.png,"多行\n说明"\n'
        f"{absolute},蓝色\n../imgs/missing.png,不存在\n../imgs/1.png,  \n",
        encoding="utf-8",
    )
    source = open_pairs(sub / "train.csv", image_column="name")
    assert source.kind == "csv" and len(source) == 5 and source.keys() == ["0", "1", "2", "3", "4"]
    pairs = list(source)
    assert [(p.key, p.caption, pixel(p)) for p in pairs] == [
        ("0", "红色,方块", RED),
        ("1", "多行 说明", GREEN),
        ("2", "蓝色", BLUE),
    ]
    assert source.skips.as_dict() == {"empty caption": 1, "missing image": 1}


def test_csv_in_gb18030_with_bom_header(tmp_path):
    (tmp_path / "1.png").write_bytes(png())
    (tmp_path / "gbk.csv").write_bytes("image,caption\n1.png,中文说明\n".encode("gb18030"))
    (tmp_path / "bom.csv").write_bytes("image , caption\n1.png,中文说明\n".encode("utf-8-sig"))
    for name in ("gbk.csv", "bom.csv"):
        assert [p.caption for p in open_pairs(tmp_path / name)] == ["中文说明"]


def test_jsonl_rows(tmp_path):
    (tmp_path / "1.png").write_bytes(png(RED))
    lines = [
        json.dumps({"image": "1.png", "caption": "红色\u2028的方块", "extra": 1}, ensure_ascii=False),
        "",
        "{not json",
        json.dumps({"image": "1.png", "caption": None}),
        json.dumps({"image": 7, "caption": "路径不是字符串"}),
        json.dumps({"image": "1.png", "caption": ["列表"]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"image": "1.png", "caption": "再一次"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = open_pairs(tmp_path / "d.jsonl")
    assert source.kind == "jsonl" and len(source) == 7  # the blank line is not a row
    pairs = list(source)
    assert [(p.key, p.caption) for p in pairs] == [("0", "红色 的方块"), ("6", "再一次")]  # U+2028 is a line break
    assert source.skips.as_dict() == {"invalid row": 3, "empty caption": 1, "invalid caption": 1}


def webdataset_shard(path, keys, *, caption_from="txt"):
    members = []
    for i, key in enumerate(keys):
        members.append((f"{key}.jpg", encode(Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)), "JPEG")))
        if caption_from == "txt":
            members.append((f"{key}.txt", f"说明 {key}".encode()))
        else:
            members.append((f"{key}.json", json.dumps({"caption": f"说明 {key}", "width": 8}).encode()))
    return write_tar(path, members)


def test_tar_shard_txt_and_json_captions(tmp_path):
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("./sub/00001.jpg", encode(Image.new("RGB", (8, 8), RED), "JPEG")),
            ("./sub/00001.txt", "  文本说明\n".encode()),
            ("./sub/00001.json", json.dumps({"caption": "被 .txt 覆盖"}).encode()),
            ("00002.png", png(GREEN)),
            ("00002.json", json.dumps({"caption": "JSON 说明"}, ensure_ascii=False).encode()),
            ("00002.npy", b"ignored"),
            ("00003.seg.png", png()),  # key 00003, extension seg.png: not an image member
            ("00003.txt", b"no image"),
            ("00004.png", png()),  # no caption member at all
            ("00005.png", png()),
            ("00005.json", json.dumps({"url": "http://x"}).encode()),
            ("._00006.png", b"macOS metadata"),
            ("00007.png", png()),
            ("00007.json", b"{broken"),
        ],
    )
    source = open_pairs(shard)
    assert source.kind == "tar"
    with pytest.raises(TypeError, match="unknown until read"):
        len(source)
    with pytest.raises(TypeError):
        source.keys()
    pairs = list(source)
    assert [(p.key, p.caption) for p in pairs] == [("sub/00001", "文本说明"), ("00002", "JSON 说明")]
    assert np.allclose(pixel(pairs[0]), RED, atol=3) and pixel(pairs[1]) == GREEN
    assert source.skips.as_dict() == {"missing caption": 2, "invalid json": 1, "missing image": 1}


def test_tar_folder_brace_pattern_and_gzip(tmp_path):
    webdataset_shard(tmp_path / "00000.tar", ["a", "b"])
    webdataset_shard(tmp_path / "00001.tar", ["c"], caption_from="json")
    with tarfile.open(tmp_path / "00002.tar.gz", "w:gz") as tar:
        for name, data in [("d.png", png(BLUE)), ("d.txt", "蓝".encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    assert [p.key for p in open_pairs(tmp_path)] == ["a", "b", "c", "d"]  # shards in name order
    pattern = str(tmp_path / "{00000..00001}.tar")
    source = open_pairs(pattern)
    assert source.shards == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    assert [(p.key, p.caption) for p in source] == [("a", "说明 a"), ("b", "说明 b"), ("c", "说明 c")]
    assert [p.caption for p in open_pairs(tmp_path / "00002.tar.gz")] == ["蓝"]


def test_expand_braces():
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{train,val}-{1..2}.tar") == ["train-1.tar", "train-2.tar", "val-1.tar", "val-2.tar"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,{b,c}}") == ["a", "b", "c"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(InvalidInputError, match="unclosed"):
        expand_braces("{0..3.tar")


# ---------------------------------------------------------------------------------------------------- robustness


def cmyk_cyan_jpeg() -> bytes:
    return encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=100)


def rgba(alpha: int) -> bytes:
    return png((255, 0, 0, alpha), mode="RGBA")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    return encode(image, transparency=0)  # index 0 (red) fully transparent


def sixteen_bit() -> bytes:
    image = Image.fromarray(np.array([[40000, 65535], [0, 257]], dtype=np.uint16))
    assert image.mode == "I;16"
    return encode(image)


def rotated_jpeg() -> bytes:
    image = Image.new("RGB", (4, 2), RED)  # 4 wide, 2 high as stored; EXIF 6 = rotate 90° clockwise to view
    exif = image.getexif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes())


IMAGES_CONVERTED = {
    # name: (file bytes, expected RGB at (0, 0) or None to skip the check, tolerance)
    "cmyk.jpg": (cmyk_cyan_jpeg, (0, 255, 255), 3),
    "rgba0.png": (lambda: rgba(0), (255, 255, 255), 0),  # red at alpha 0 is white, not red or black
    "rgba128.png": (lambda: rgba(128), (255, 127, 127), 1),
    "la.png": (lambda: png((0, 0), mode="LA"), (255, 255, 255), 0),
    "grey.png": (lambda: png(77, mode="L"), (77, 77, 77), 0),
    "bilevel.png": (lambda: png(1, mode="1"), (255, 255, 255), 0),
    "palette.gif": (lambda: encode(Image.new("RGB", (8, 8), BLUE).convert("P"), "GIF"), BLUE, 0),
    "palette_transparent.png": (palette_with_transparency, (255, 255, 255), 0),
    "sixteen.png": (sixteen_bit, (156, 156, 156), 0),  # 40000 / 257 = 155.6, not clipped to 255
    "bmp.bmp": (lambda: encode(Image.new("RGB", (8, 8), GREEN), "BMP"), GREEN, 0),
    "rotated.jpg": (rotated_jpeg, None, 0),
}

IMAGES_SKIPPED = {
    "zero.jpg": (lambda: b"", "zero-byte image"),
    "truncated.jpg": (lambda: noisy_jpeg()[: len(noisy_jpeg()) // 2], "truncated image"),
    "truncated.png": (lambda: encode(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9))[:-40], "truncated image"),
    "garbage.png": (lambda: bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)), "corrupt image"),
    "text.jpg": (lambda: "这不是图片".encode(), "corrupt image"),
    "damaged.jpg": (lambda: noisy_jpeg()[:600] + b"\0" * 300 + noisy_jpeg()[900:], "corrupt image"),
    "huge.png": (lambda: png_claiming_size(9000, 9000), "oversized image"),  # over 8192², under Pillow's own limit
    "bomb.png": (lambda: png_claiming_size(20000, 20000), "oversized image"),  # Pillow's DecompressionBombError
}

CAPTIONS = {
    # caption file bytes: expected caption, or the skip reason
    "gb18030": ("一只戴帽子的猫，油画".encode("gb18030"), "一只戴帽子的猫，油画"),
    "utf8sig": ("\ufeff水墨山水".encode(), "水墨山水"),
    "utf16": ("赛博朋克城市".encode("utf-16"), "赛博朋克城市"),
    "multiline": ("  第一行\r\n\t第二行 \n\n".encode(), "第一行 第二行"),
    "empty": (b"", "empty caption"),
    "blank": ("  \n\u3000\t\n".encode(), "empty caption"),  # ideographic space is whitespace too
    "binary": (b"\x80\x80\xff\xfe\x00\x81", "undecodable caption"),
}


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    root.mkdir()
    for name, (make, *_) in {**IMAGES_CONVERTED, **IMAGES_SKIPPED}.items():
        (root / name).write_bytes(make())
        (root / name).with_suffix(".txt").write_text(f"说明 {name}", encoding="utf-8")
    for name, (data, _) in CAPTIONS.items():
        (root / f"cap_{name}.png").write_bytes(png())
        (root / f"cap_{name}.txt").write_bytes(data)
    return root


def test_every_broken_sample_is_skipped_and_counted(messy, taiyi_log):
    skips = SkipCounter()
    source = open_pairs(messy, skips=skips)
    pairs = {p.key: p for p in source}
    expected_skips = Counter(reason for _, reason in IMAGES_SKIPPED.values())
    expected_skips.update(want for name, (_, want) in CAPTIONS.items() if " caption" in want)
    assert skips.as_dict() == dict(expected_skips) == source.skips.as_dict()
    assert skips.total == len(IMAGES_SKIPPED) + 3
    assert len(pairs) == len(source) - skips.total
    assert all(p.image.mode == "RGB" for p in pairs.values())
    (summary,) = [m for m in taiyi_log.messages if "skipped" in m]
    assert summary == f"{messy}: read {len(pairs)} pairs; {skips.summary()}"


def test_image_modes_converted_to_rgb(messy):
    pairs = {p.key: p for p in open_pairs(messy)}
    for name, (_, expected, tolerance) in IMAGES_CONVERTED.items():
        if expected is not None:
            got = pixel(pairs[name])
            assert np.allclose(got, expected, atol=tolerance), (name, got)
    assert pixel(pairs["palette_transparent.png"], (1, 1)) == BLUE  # opaque pixels keep their colour
    sixteen = pairs["sixteen.png"].image
    assert [sixteen.getpixel(xy)[0] for xy in [(1, 0), (0, 1), (1, 1)]] == [255, 0, 1]
    assert pairs["rotated.jpg"].image.size == (2, 4)  # EXIF orientation applied


def test_caption_encodings_and_cleaning(messy):
    pairs = {p.key: p for p in open_pairs(messy)}
    for name, (_, expected) in CAPTIONS.items():
        if " caption" not in expected:
            assert pairs[f"cap_{name}.png"].caption == expected


def test_robustness_in_tar_shards(tmp_path):
    members = [("ok.png", png()), ("ok.txt", b"good")]
    for name, (make, _) in IMAGES_SKIPPED.items():
        stem = name.replace(".", "_")
        members += [(f"{stem}.{name.rsplit('.', 1)[1]}", make()), (f"{stem}.txt", b"caption")]
    members += [("cmyk.jpg", cmyk_cyan_jpeg()), ("cmyk.json", json.dumps({"caption": "青色"}).encode())]
    members += [("gbk.png", png()), ("gbk.txt", "中文".encode("gb18030")), ("blank.png", png()), ("blank.txt", b" ")]
    source = open_pairs(write_tar(tmp_path / "messy.tar", members))
    pairs = {p.key: p for p in source}
    assert sorted(pairs) == ["cmyk", "gbk", "ok"]
    assert np.allclose(pixel(pairs["cmyk"]), (0, 255, 255), atol=3) and pairs["gbk"].caption == "中文"
    expected = Counter(reason for _, reason in IMAGES_SKIPPED.values()) + Counter({"empty caption": 1})
    assert source.skips.as_dict() == dict(expected)


def test_damaged_shard_keeps_what_came_before(tmp_path, taiyi_log):
    full = webdataset_shard(tmp_path / "full.tar", [f"{i:03d}" for i in range(6)]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: len(full) // 2])
    source = open_pairs(cut)
    keys = [p.key for p in source]
    assert 0 < len(keys) < 6 and keys == [f"{i:03d}" for i in range(len(keys))]
    assert source.skips.as_dict() == {"damaged shard": 1}
    assert any("is damaged" in r.message and r.levelno == logging.WARNING for r in taiyi_log.records)


# ---------------------------------------------------------------------------------------------------- sharding


@pytest.fixture
def shards(tmp_path):
    """Five shards of three samples each (an odd count, so readers get unequal shares)."""
    for s in range(5):
        webdataset_shard(tmp_path / f"{s:05d}.tar", [f"s{s}-{i}" for i in range(3)])
    return tmp_path


ALL_KEYS = sorted(f"s{s}-{i}" for s in range(5) for i in range(3))


def loader_keys(source, num_workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(source, batch_size=4, num_workers=num_workers, collate_fn=collate_pairs)
    return [pair.key for batch in loader for pair in batch]


def test_tar_shards_split_across_dataloader_workers(shards):
    keys = loader_keys(open_pairs(shards), num_workers=2)
    assert sorted(keys) == ALL_KEYS  # each sample exactly once


def test_tar_shards_split_across_ranks_and_workers(shards):
    per_rank = [[p.key for p in open_pairs(shards, rank=r, world_size=2)] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == ALL_KEYS and not set(per_rank[0]) & set(per_rank[1])
    source = open_pairs(f"{shards}/{{00000..00004}}.tar")
    assert [p.key for p in source.shard(1, 2)] == per_rank[1]
    both = [k for r in range(2) for k in loader_keys(source.shard(r, 2), num_workers=2)]
    assert sorted(both) == ALL_KEYS


def test_too_few_shards_warns_but_reads_everything_once(shards, taiyi_log):
    parts = [open_pairs(shards / "00000.tar").shard(r, 2) for r in range(2)]
    assert sorted(p.key for part in parts for p in part) == ["s0-0", "s0-1", "s0-2"]
    assert any("gets none" in m for m in taiyi_log.messages)


def test_indexable_sources_split_across_ranks_and_workers(tmp_path):
    for i in range(7):
        (tmp_path / f"{i}.png").write_bytes(png())
        (tmp_path / f"{i}.txt").write_text(f"说明 {i}", encoding="utf-8")
    source = open_pairs(tmp_path)
    parts = [source.shard(r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [4, 3] and parts[1].keys() == ["1.png", "3.png", "5.png"]
    keys = [k for part in parts for k in loader_keys(part, num_workers=2)]
    assert sorted(keys) == [f"{i}.png" for i in range(7)]


# ---------------------------------------------------------------------------------------------------- map-style


def test_indexed_pairs_with_dataloader_drops_skipped(messy):
    dataset = IndexedPairs(messy)
    assert isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == len(dataset.keys())
    assert dataset[dataset.keys().index("zero.jpg")] is None and dataset.skips.as_dict() == {"zero-byte image": 1}
    assert dataset[-len(dataset)].key == dataset.keys()[0] == "bilevel.png"  # negative indices count from the end
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_pairs)
    keys = [p.key for batch in loader for p in batch]
    assert len(keys) == len(dataset) - len(IMAGES_SKIPPED) - 3
    assert not {"zero.jpg", "huge.png", "cap_empty.png"} & set(keys)


def test_indexed_pairs_in_workers_and_csv(tmp_path):
    (tmp_path / "1.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"")
    (tmp_path / "d.csv").write_text("name,caption\n1.png,好\nbad.png,坏\nnone.png,无\n1.png,再\n", encoding="utf-8")
    dataset = IndexedPairs(tmp_path / "d.csv", image_column="name")
    assert [dataset[i] is None for i in range(4)] == [False, True, True, False]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_pairs)
    assert sorted((p.key, p.caption) for batch in loader for p in batch) == [("0", "好"), ("3", "再")]


# ---------------------------------------------------------------------------------------------------- SkipCounter


def test_skip_counter_is_thread_safe_and_summarises():
    skips = SkipCounter()
    assert skips.total == 0 and skips.summary() == "skipped 0 samples"

    def work():
        for i in range(1000):
            skips.add("corrupt image" if i % 2 else "empty caption", str(i))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert skips.as_dict() == {"corrupt image": 2000, "empty caption": 2000} and skips.total == 4000
    skips.add("truncated image", "x")
    assert skips.summary() == "skipped 4001 samples: 2000 corrupt image, 2000 empty caption, 1 truncated image"
    copy = pickle.loads(pickle.dumps(skips))  # DataLoader workers under "spawn" pickle the data set
    copy.add("truncated image", "y")
    assert copy.as_dict()["truncated image"] == 2 and skips.as_dict()["truncated image"] == 1


def test_source_pickles_for_spawned_workers(folder):
    source = pickle.loads(pickle.dumps(open_pairs(folder).shard(0, 1)))
    assert isinstance(source, PairSource) and [p.key for p in source] == ["a.jpg", "b/c.png", "b/deep/d.webp"]


# ---------------------------------------------------------------------------------------------------- user mistakes


def one_line_error(call, match: str) -> str:
    with pytest.raises(InvalidInputError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_structural_mistakes_are_one_line_errors(tmp_path):
    one_line_error(lambda: open_pairs(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: open_pairs(tmp_path / "empty"), "no image-caption pairs: no .jpg")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(png())
    (tmp_path / "imgs" / "meta.csv").write_text("name,caption\n1.png,x\n", encoding="utf-8")
    message = one_line_error(lambda: open_pairs(tmp_path / "imgs"), "1 images but no caption files")
    assert "meta.csv" in message  # points at the CSV that probably holds the captions

    (tmp_path / "t.csv").write_text("name,caption\n1.png,x\n", encoding="utf-8")
    message = one_line_error(lambda: open_pairs(tmp_path / "t.csv"), "no column for the image column 'image'")
    assert "name, caption" in message and "--image-column name" in message
    one_line_error(lambda: open_pairs(tmp_path / "t.csv", image_column="name", caption_column="text"), "'text'")
    (tmp_path / "e.csv").write_text("", encoding="utf-8")
    one_line_error(lambda: open_pairs(tmp_path / "e.csv"), "is empty")
    (tmp_path / "h.csv").write_text("image,caption\n", encoding="utf-8")
    one_line_error(lambda: open_pairs(tmp_path / "h.csv"), "no rows")
    (tmp_path / "d.jsonl").write_text('{"path": "1.png", "caption": "x"}\n', encoding="utf-8")
    one_line_error(lambda: open_pairs(tmp_path / "d.jsonl"), "no field for the image column 'image'")
    (tmp_path / "j.jsonl").write_text("[1]\nnot json\n", encoding="utf-8")
    one_line_error(lambda: open_pairs(tmp_path / "j.jsonl"), "no JSON object lines")

    (tmp_path / "fake.tar").write_bytes(b"this is not a tar archive" * 40)
    one_line_error(lambda: open_pairs(tmp_path / "fake.tar"), "fake.tar is not a tar archive")
    (tmp_path / "zero.tar").write_bytes(b"")
    one_line_error(lambda: open_pairs(tmp_path / "zero.tar"), "not a tar archive")
    webdataset_shard(tmp_path / "00000.tar", ["a"])
    one_line_error(lambda: open_pairs(f"{tmp_path}/{{00000..00002}}.tar"), "2 of 3 shards .* do not exist")
    one_line_error(lambda: open_pairs(f"{tmp_path}/{{a,b}}.csv"), "not a tar shard")
    one_line_error(lambda: IndexedPairs(tmp_path / "00000.tar"), "can only be streamed; use open_pairs")
    (tmp_path / "notes.parquet").write_bytes(b"PAR1")
    one_line_error(lambda: open_pairs(tmp_path / "notes.parquet"), "not a layout taiyi reads")
    one_line_error(lambda: open_pairs(tmp_path / "00000.tar", rank=2, world_size=2), "need 0 <= rank < world_size")
    one_line_error(lambda: open_pairs(tmp_path / "00000.tar").shard(0, 0), "need 0 <= rank")
    one_line_error(lambda: open_pairs(tmp_path / "imgs", caption_files=("txt",)), "extension 'txt' is invalid")


def test_custom_caption_extension(tmp_path):
    (tmp_path / "1.png").write_bytes(png())
    (tmp_path / "1.caption").write_text("自定义", encoding="utf-8")
    (tmp_path / "1.txt").write_text("普通", encoding="utf-8")
    assert [p.caption for p in open_pairs(tmp_path, caption_files=(".caption", ".txt"))] == ["自定义"]
    assert [p.caption for p in open_pairs(tmp_path)] == ["普通"]
