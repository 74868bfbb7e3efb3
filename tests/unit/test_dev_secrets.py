"""The dev stack's secrets are its data folder's own: random on first start, private
(0600), the same on every restart, never the public defaults in the source."""

from __future__ import annotations

import stat
from pathlib import Path

from pydantic import SecretStr

from app.devstack.stack import EMBED_KEY_FILE, PEPPER_FILE, with_folder_secrets
from app.settings import DEV_KEY_PEPPER, AuthSettings


def folder_auth(data_dir: Path) -> AuthSettings:
    # explicit defaults: the environment must not leak AUTH_* in
    return with_folder_secrets(AuthSettings(key_pepper=SecretStr(DEV_KEY_PEPPER),
                                            embed_signing_key=None, platform_admin_key=None),
                               data_dir)


def secrets_of(auth: AuthSettings) -> tuple[str, bytes, str]:
    admin = auth.platform_admin_key
    assert admin is not None
    return auth.key_pepper.get_secret_value(), auth.embed_key(), admin.get_secret_value()


def test_each_data_folder_gets_its_own_private_secrets_reused_on_restart(
    tmp_path: Path,
) -> None:
    (one := tmp_path / "one").mkdir()
    (two := tmp_path / "two").mkdir()
    first, other = secrets_of(folder_auth(one)), secrets_of(folder_auth(two))
    assert all(a != b for a, b in zip(first, other, strict=True))
    public = AuthSettings(key_pepper=SecretStr(DEV_KEY_PEPPER), embed_signing_key=None)
    assert first[0] != DEV_KEY_PEPPER and first[1] != public.embed_key()
    assert len(first[0]) >= 32 and len(first[1]) >= 32
    for name in (PEPPER_FILE, EMBED_KEY_FILE, "platform-admin-key"):
        assert stat.S_IMODE((one / name).stat().st_mode) == 0o600, name
    assert secrets_of(folder_auth(one)) == first  # a restart reads the same files


def test_secrets_given_in_settings_win_over_the_folder(tmp_path: Path) -> None:
    given = AuthSettings(key_pepper=SecretStr("p" * 40), embed_signing_key=SecretStr("e" * 40),
                         platform_admin_key=SecretStr("a" * 40))
    assert secrets_of(with_folder_secrets(given, tmp_path)) == secrets_of(given)
    assert not (tmp_path / PEPPER_FILE).exists() and not (tmp_path / EMBED_KEY_FILE).exists()
