"""``storage.dtype``: validated like every key, fingerprinted, and compatible with older manifests."""

from __future__ import annotations

import pytest

from pipeline.app.config import fingerprint_differences
from pipeline.app.config_file import parse_config
from pipeline.app.settings import generator_settings
from pipeline.core.errors import ConfigError
from pipeline.core.feature_encoding import bytes_per_token
from tests.app.test_config import BASE, with_


def test_the_default_stores_as_captured_and_reaches_the_generators() -> None:
    assert parse_config(BASE).storage.dtype == "as_captured"
    config = parse_config(with_(storage={"dtype": "fp8_e4m3"}))
    assert generator_settings(config, "gen-0", None).storage_dtype == "fp8_e4m3"


def test_an_unknown_dtype_is_one_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_(storage={"dtype": "fp8"}))
    assert "storage.dtype" in str(caught.value) and "fp8_e4m3" in str(caught.value)


def test_a_manifest_written_before_the_key_existed_still_matches_the_default() -> None:
    base = parse_config(BASE)
    old_manifest = {k: v for k, v in base.fingerprint_values().items() if k != "storage.dtype"}
    assert "storage.dtype" not in base.fingerprint_values(), "the default leaves the hash of older runs alone"
    assert fingerprint_differences(old_manifest, base.fingerprint_values()) == []
    compact = parse_config(with_(storage={"dtype": "bf16"}))
    assert fingerprint_differences(old_manifest, compact.fingerprint_values()) == [
        'storage.dtype: "as_captured" in the run, "bf16" here'
    ]


def test_the_storage_projection_counts_the_stored_bytes() -> None:
    # Llama-3.1-8B captured in bf16: 32,777 B per token as captured (the production example's figure)
    assert bytes_per_token(4096, 2, "as_captured") == bytes_per_token(4096, 2, "bf16") == 32_777
    assert bytes_per_token(4096, 2, "fp8_e4m3") == 4 * 4096 + 9 + 8  # one byte per value, two float32 scales
    assert bytes_per_token(64, 4, "fp8_e4m3") == 273  # the tiny target: 0.26x of its 1,033 B as captured
