"""inspect_shards: statistics for good shards, every problem named by shard and key for bad ones."""

from __future__ import annotations

import json

from corpus import image_bytes, truncate_inside_last_image, write_tar

from mmscale.shards.inspection import main
from mmscale.shards.synthetic import make_synthetic_shards


def test_good_shards_pass_and_print_statistics(tmp_path, capsys):
    make_synthetic_shards(tmp_path, 12, samples_per_shard=5)
    assert main([str(tmp_path / "shard-{000000..000002}.tar"), "--samples", "2", "--check-sizes",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "shards: 3   samples: 12" in out
    assert "image width    min 64  median 64" in out
    assert "labels: 12 labelled samples" in out
    assert "000000001" in out and "000000002" not in out.split("samples:")[-1]


def test_every_problem_is_reported_with_shard_and_key(tmp_path, capsys):
    good = image_bytes((32, 32))
    write_tar(tmp_path / "shard-000000.tar", [
        ("000000000.jpg", good), ("000000000.txt", b"fine"),
        ("000000001.jpg", b"\xff\xd8 broken jpeg"), ("000000001.txt", b"bad image"),
        ("000000002.jpg", good),
        ("000000003.jpg", good), ("000000003.txt", b"caf\xe9"),
        ("000000004.txt", b"no image at all"),
        ("000000005.jpg", good), ("000000005.txt", b"label"), ("000000005.cls", b"cat"),
        ("000000006.jpg", good), ("000000006.txt", b"label"), ("000000006.cls", b"--5"),
    ])
    write_tar(tmp_path / "shard-000001.tar", [("000000000.jpg", good), ("000000000.txt", b"repeated key")]
              + [(f"00000001{i}.{ext}", good if ext == "jpg" else b"x") for i in range(3) for ext in ("jpg", "txt")])
    truncate_inside_last_image(tmp_path / "shard-000001.tar")
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 5, "shard-000001.tar": 4}))
    assert main([str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    first, second = tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"
    expected = [f"shard {first} key 000000001: image does not decode",
                f"shard {first} key 000000002: no caption",
                f"shard {first} key 000000003: caption is not UTF-8",
                f"shard {first} key 000000004: no image member",
                f"shard {first} key 000000005: label 'cat' in .cls is not an integer",
                f"shard {first} key 000000006: label '--5' in .cls is not an integer",
                f"shard {second}: truncated or corrupt tar",
                f"shard {second} key 000000000: key repeated (also in shard {first})",
                f"shard {first}: {tmp_path / 'sizes.json'} says 5 samples, the tar has 7"]
    for problem in expected:
        assert problem in err, problem
    assert "Traceback" not in err


def test_missing_sizes_file_and_missing_shard(tmp_path, capsys):
    write_tar(tmp_path / "a.tar", [("k.jpg", image_bytes()), ("k.txt", b"caption")])
    assert main([str(tmp_path / "a.tar"), "--no-progress"]) == 0
    assert main([str(tmp_path / "a.tar"), "--check-sizes", "--no-progress"]) == 1
    assert "no " + str(tmp_path / "sizes.json") in capsys.readouterr().err
    assert main([str(tmp_path / "{a,b}.tar"), "--no-progress"]) == 1
    assert f"shard {tmp_path / 'b.tar'}: no such file" in capsys.readouterr().err
