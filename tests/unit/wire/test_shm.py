"""Same-host transfer pieces: region files, probes, the encoder's offer check, its config."""

from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

from encoder_service.__main__ import parse_args
from encoder_service.config import EncoderConfig
from mmserve.wire.chunks import chunks_to_tensor, dtype_to_pb, tensor_to_chunks
from mmserve.wire.shm import (
    ShmOffers,
    create_probe,
    new_region_name,
    read_region,
    remove_probe,
    remove_stale_regions,
    write_region,
)
from protos import encoder_pb2


def special_rows(dtype: torch.dtype) -> torch.Tensor:
    """Random rows plus values whose bits must survive exactly: -0, inf, nan, subnormals."""
    rows = torch.randn(40, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    rows[0, :5] = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan"),
                                torch.finfo(dtype).tiny / 2], dtype=dtype)
    return rows


def header_for(rows: torch.Tensor) -> encoder_pb2.ItemHeader:
    return encoder_pb2.ItemHeader(num_tokens=rows.shape[0], hidden_size=rows.shape[1],
                                  dtype=dtype_to_pb(rows.dtype))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = torch.int32 if a.element_size() == 4 else torch.int16
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_region_round_trips_bit_exactly_like_chunks(tmp_path, dtype):
    rows = special_rows(dtype)
    name = new_region_name()
    region = write_region(str(tmp_path), name, rows)
    assert region.name == name and region.nbytes == 40 * 24 * rows.element_size()
    assert (tmp_path / name).stat().st_size == region.nbytes
    received = read_region(str(tmp_path), header_for(rows), region)
    in_band = chunks_to_tensor(header_for(rows), tensor_to_chunks(rows, 1024))
    assert same_bits(received, rows) and same_bits(received, in_band)
    assert list(tmp_path.iterdir()) == []  # the reader unlinked it


def test_region_bytes_are_little_endian(tmp_path):
    rows = torch.tensor([[1.0, -2.0]], dtype=torch.float32)
    name = new_region_name()
    write_region(str(tmp_path), name, rows)
    assert (tmp_path / name).read_bytes() == bytes.fromhex("0000803f000000c0")


@pytest.mark.parametrize("name", ["../victim", "mmserve-emb-../../victim", "victim",
                                  "mmserve-emb-" + "A" * 32, "mmserve-emb-" + "0" * 31,
                                  "mmserve-emb-" + "0" * 32 + "/x"])
def test_a_malicious_region_name_is_refused_without_touching_anything(tmp_path, name):
    shared = tmp_path / "shm"
    shared.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 8)
    region = encoder_pb2.ShmRegion(name=name, nbytes=8)
    header = encoder_pb2.ItemHeader(num_tokens=1, hidden_size=2, dtype=dtype_to_pb(torch.float32))
    with pytest.raises(ValueError, match="refusing shared-memory region name"):
        read_region(str(shared), header, region)
    assert victim.read_bytes() == b"x" * 8


def test_a_size_mismatch_is_refused_and_the_file_still_removed(tmp_path):
    rows = special_rows(torch.float16)
    region = write_region(str(tmp_path), new_region_name(), rows)
    region.nbytes += 2
    with pytest.raises(ValueError, match="region has 1922 bytes, the header says 40 x 24 x 2"):
        read_region(str(tmp_path), header_for(rows), region)
    assert list(tmp_path.iterdir()) == []


def test_a_short_file_and_a_symlink_are_refused(tmp_path):
    rows = special_rows(torch.float32)
    name = new_region_name()
    (tmp_path / name).write_bytes(b"\0" * 100)
    region = encoder_pb2.ShmRegion(name=name, nbytes=rows.numel() * 4)
    with pytest.raises(ValueError, match="not a plain file of 3840 bytes"):
        read_region(str(tmp_path), header_for(rows), region)
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 3840)
    (tmp_path / name).symlink_to(target)
    with pytest.raises(OSError):
        read_region(str(tmp_path), header_for(rows), region)
    assert target.exists() and not (tmp_path / name).exists()


def test_a_probe_is_accepted_for_the_same_directory_and_token(tmp_path):
    offer = create_probe(str(tmp_path))
    assert offer.dir == str(tmp_path) and len(offer.probe_token) == 16
    assert (tmp_path / offer.probe_name).read_bytes() == offer.probe_token
    offers = ShmOffers(str(tmp_path) + "/")
    assert offers.accept(offer)
    remove_probe(offer)
    assert not (tmp_path / offer.probe_name).exists()
    assert offers.accept(offer)  # proven once, remembered


def bad_offers(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    good = create_probe(str(tmp_path))
    elsewhere = create_probe(str(other))
    (tmp_path / "x").write_bytes(good.probe_token)
    return {
        "wrong token": encoder_pb2.ShmOffer(dir=good.dir, probe_name=good.probe_name,
                                            probe_token=bytes(16)),
        "wrong dir": elsewhere,
        "wrong dir, same name": encoder_pb2.ShmOffer(dir=str(other), probe_name=good.probe_name,
                                                     probe_token=good.probe_token),
        "bad name": encoder_pb2.ShmOffer(dir=good.dir, probe_name="../x",
                                         probe_token=good.probe_token),
        "plain name": encoder_pb2.ShmOffer(dir=good.dir, probe_name="x",
                                           probe_token=good.probe_token),
        "missing probe": encoder_pb2.ShmOffer(dir=good.dir,
                                              probe_name="mmserve-probe-" + "0" * 32,
                                              probe_token=good.probe_token),
        "no dir": encoder_pb2.ShmOffer(probe_name=good.probe_name, probe_token=good.probe_token),
    }


@pytest.mark.parametrize("case", ["wrong token", "wrong dir", "wrong dir, same name", "bad name",
                                  "plain name", "missing probe", "no dir"])
def test_offers_that_do_not_prove_the_directory_are_declined(tmp_path, case):
    assert not ShmOffers(str(tmp_path)).accept(bad_offers(tmp_path)[case])


def test_a_disabled_encoder_declines_every_offer(tmp_path):
    offer = create_probe(str(tmp_path))
    assert not ShmOffers("").accept(offer)


def test_a_fifo_probe_does_not_block(tmp_path):
    name = "mmserve-probe-" + "1" * 32
    os.mkfifo(tmp_path / name)
    offer = encoder_pb2.ShmOffer(dir=str(tmp_path), probe_name=name, probe_token=bytes(16))
    assert not ShmOffers(str(tmp_path)).accept(offer)


def test_proven_probes_are_bounded(tmp_path):
    offers = ShmOffers(str(tmp_path), max_known=2)
    first, second, third = (create_probe(str(tmp_path)) for _ in range(3))
    assert all(offers.accept(o) for o in (first, second, third))
    for offer in (first, second, third):
        remove_probe(offer)
    assert not offers.accept(first)  # forgotten, and its file is gone
    assert offers.accept(second) and offers.accept(third)


def test_stale_regions_are_swept_and_fresh_ones_kept(tmp_path):
    rows = special_rows(torch.float32)
    old, fresh = new_region_name(), new_region_name()
    write_region(str(tmp_path), old, rows)
    write_region(str(tmp_path), fresh, rows)
    (tmp_path / "unrelated").write_bytes(b"")
    past = time.time() - 3600
    os.utime(tmp_path / old, (past, past))
    os.utime(tmp_path / "unrelated", (past, past))
    assert remove_stale_regions(str(tmp_path), 300) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh, "unrelated"])


def test_encoder_shm_dir_defaults_to_dev_shm_and_can_be_turned_off(tmp_path):
    expected = "/dev/shm" if os.path.isdir("/dev/shm") else ""
    assert EncoderConfig().shm_dir == expected
    assert EncoderConfig(shm_dir="").shm_dir == ""
    assert EncoderConfig(shm_dir=str(tmp_path) + "/").shm_dir == str(tmp_path)
    with pytest.raises(ValueError, match="shm_dir must be an existing directory or empty"):
        EncoderConfig(shm_dir=str(tmp_path / "missing"))


def test_encoder_shm_dir_flag_env_and_yaml(tmp_path):
    assert parse_args(["--shm-dir", ""], {}).shm_dir == ""
    assert parse_args([], {"MMSERVE_ENCODER_SHM_DIR": str(tmp_path)}).shm_dir == str(tmp_path)
    config = EncoderConfig.from_sources({"shm_dir": ""}, argparse.Namespace(shm_dir=None))
    assert config.shm_dir == ""
