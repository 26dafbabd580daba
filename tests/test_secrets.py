"""Secrets: where the token and DSN come from, who may read them, and who inherits them."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest

import ango
from ango.config import configured_dsn, data_dir
from ango.errors import ConfigurationError
from ango.tokens import ensure_token, read_token
from tests.servers import TOKEN, ServeProcess, connect, hello


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("ANGO_TOKEN", "ANGO_TOKEN_FILE", "ANGO_DSN", "DATABASE_URL", "ANGO_DSN_FILE",
                 "ANGO_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_token_file_others_can_read_is_made_private_with_a_warning(tmp_path, clean_env, caplog):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o666)
    clean_env.setenv("ANGO_TOKEN_FILE", str(secret))
    with caplog.at_level(logging.WARNING):
        assert read_token() == TOKEN
    assert mode(secret) & 0o027 == 0
    assert "other users could read or change it" in caplog.text


def test_a_group_readable_token_file_as_kubernetes_mounts_it_is_accepted(tmp_path, clean_env,
                                                                          caplog):
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    secret.chmod(0o440)
    with caplog.at_level(logging.WARNING):
        assert read_token(token_file=secret) == TOKEN
    assert mode(secret) == 0o440 and caplog.text == ""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
def test_a_token_file_of_another_user_is_refused(tmp_path, clean_env):
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    secret.chmod(0o600)
    os.chown(secret, 4242, -1)
    with pytest.raises(ConfigurationError, match="belongs to another user"):
        read_token(token_file=secret)


def test_the_data_directory_is_private_whatever_the_umask(tmp_path, clean_env, caplog):
    old = os.umask(0)
    try:
        made = data_dir(tmp_path / "new")
        token, path = ensure_token(made)
    finally:
        os.umask(old)
    assert mode(made) == 0o700 and mode(path) == 0o600
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could have replaced the token before the next start
    with caplog.at_level(logging.WARNING):
        data_dir(shared)
    assert mode(shared) & 0o022 == 0 and "data directory" in caplog.text


def test_the_dsn_comes_from_a_file(tmp_path, clean_env):
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://ango:pw@db.example/ango\n")
    dsn_file.chmod(0o400)
    clean_env.setenv("ANGO_DSN_FILE", str(dsn_file))
    assert configured_dsn() == "postgresql://ango:pw@db.example/ango"
    clean_env.setenv("ANGO_DSN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="cannot read DSN file"):
        configured_dsn()
    dsn_file.chmod(0o600)
    dsn_file.write_text("\n")  # an unfilled Secret: not the embedded server instead
    clean_env.setenv("ANGO_DSN_FILE", str(dsn_file))
    with pytest.raises(ConfigurationError, match="DSN file .* is empty"):
        configured_dsn()


def test_ango_serve_reads_its_token_from_a_file_and_warns_about_one_on_the_command_line(
        tmp_path, clean_env):
    secret = tmp_path / "mounted-token"
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o400)
    quiet = ServeProcess("--noop", "--data-dir", str(tmp_path / "d1"),
                         env={"ANGO_TOKEN_FILE": str(secret)}).start()
    try:
        with connect(quiet.port) as sock:
            assert type(hello(sock, TOKEN)).__name__ == "Welcome"
        assert "warning" not in quiet.stderr and f"token in {secret}" in quiet.stderr
    finally:
        quiet.stop()
    loud = ServeProcess("--noop", "--token", TOKEN, "--data-dir", str(tmp_path / "d2")).start()
    try:
        assert "--token on the command line can be read by every user" in loud.stderr
    finally:
        loud.stop()


def test_shards_do_not_inherit_the_servers_secrets(dsn, clean_env):
    clean_env.setenv("ANGO_TOKEN", "the-admin-token")
    clean_env.setenv("DATABASE_URL", dsn)

    async def environment_of_a_shard() -> bytes:
        async with ango.Allocator(dsn, shards=1) as alloc:
            return Path(f"/proc/{alloc.shard_pids()[0]}/environ").read_bytes()

    env = dict(item.split(b"=", 1) for item in asyncio.run(environment_of_a_shard()).split(b"\0")
               if b"=" in item)
    assert b"ANGO_TOKEN" not in env and b"DATABASE_URL" not in env
    assert env[b"ANGO_SHARD_DSN"] == dsn.encode()
