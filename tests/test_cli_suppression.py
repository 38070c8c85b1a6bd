"""`relay suppression ...` run as a real subprocess against a running relay's queue: what
it adds, the relay refuses at RCPT once it has followed the change; imports of the CSV
files SendGrid, Mailgun and SES export."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from relay.app import Relay
from relay.cli.suppression import parse_created, read_csv
from relay.config import SuppressionConfig, parse_duration
from tests.conftest import RelayFactory
from tests.fakes.relay_process import relay_cli
from tests.smtp.test_bad_input import RawSession


def cli_config(relay: Relay, tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(f'[server]\nqueue = "{relay.config.queue_dir}"\n{extra}')
    return path


async def rcpt_reply(relay: Relay, rcpt: str) -> str:
    smtp = await RawSession.open(relay.smtp_ports()[0])
    try:
        assert (await smtp.cmd("EHLO client.test")).startswith("250")
        assert (await smtp.cmd("MAIL FROM:<app@example.com>")).startswith("250")
        return await smtp.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        await smtp.close()


async def test_add_list_remove_against_a_running_relay(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay()
    cfg = cli_config(relay, tmp_path)
    code, out, err = await relay_cli(
        "suppression", "add", "Gone@Example.org", "--expires", "30d", "--detail", "asked",
        config=cfg,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("suppressed gone@example.org (added by an operator) until ")

    assert relay.suppression is not None
    await relay.suppression.refresh()  # what its poll does every two seconds
    reply = await rcpt_reply(relay, "gone@example.org")
    assert reply.startswith("550 5.1.1 <gone@example.org>: recipient is on the suppression list")
    assert "via cli:" in reply

    code, out, _ = await relay_cli("suppression", "list", "--json", config=cfg)
    assert code == 0
    (entry,) = json.loads(out)
    assert entry["address"] == "gone@example.org" and entry["reason"] == "manual"
    assert entry["detail"] == "asked" and entry["source"].startswith("cli:")
    assert entry["expires_epoch"] == pytest.approx(time.time() + 30 * 86400, abs=60)
    code, out, _ = await relay_cli("suppression", "list", "--search", "GONE", config=cfg)
    assert "gone@example.org" in out and out.rstrip().endswith("-- 1 entry")

    code, out, _ = await relay_cli("suppression", "remove", "gone@example.org", config=cfg)
    assert (code, out.strip()) == (0, "removed gone@example.org (1 entry)")
    await relay.suppression.refresh()
    assert (await rcpt_reply(relay, "gone@example.org")).startswith("250")
    code, _, err = await relay_cli("suppression", "remove", "gone@example.org", config=cfg)
    assert code == 1
    assert "gone@example.org is not on the suppression list" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody"], "'nobody' is not a full address such as user@example.com"),
        (["a@example.org", "--expires", "soon"], "expires: 'soon' is not a duration"),
        (["a@example.org", "--scope", "not a domain"], "is not a domain name"),
    ],
)
async def test_add_refuses_bad_values_and_says_why(
    make_relay: RelayFactory, tmp_path: Path, args: list[str], message: str
) -> None:
    relay = await make_relay()
    code, _, err = await relay_cli("suppression", "add", *args, config=cli_config(relay, tmp_path))
    assert code == 2 and message in err


SENDGRID_BOUNCES = """created,email,reason,status
1714557600,bounced@example.org,"550 5.1.1 The email account does not exist",5.1.1
1714557601,BOUNCED@example.org,"550 5.1.1 again",5.1.1
1714557602,not-an-address,"550",5.1.1
"""

MAILGUN_BOUNCES = """address,code,error,created_at
gone@example.net,550,"No such user","Tue, 14 May 2024 10:00:00 UTC"
,,,
"""

SES_SUPPRESSIONS = """EmailAddress,Reason,LastUpdateTime
hard@example.com,BOUNCE,2024-05-01T10:00:00Z
spam@example.com,COMPLAINT,2024-05-01T11:00:00.000Z
"""


async def test_import_provider_exports(make_relay: RelayFactory, tmp_path: Path) -> None:
    relay = await make_relay()
    cfg = cli_config(relay, tmp_path)
    files = {
        "sendgrid.csv": SENDGRID_BOUNCES,
        "mailgun.csv": MAILGUN_BOUNCES,
        "ses.csv": "\ufeff" + SES_SUPPRESSIONS,  # with the byte-order mark Excel writes
    }
    reports = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        code, out, err = await relay_cli("suppression", "import", str(tmp_path / name), config=cfg)
        reports[name] = (code, out.strip(), err.strip())
    assert reports["sendgrid.csv"][:2] == (
        0,
        "sendgrid.csv: added 1, skipped 1 (blank, repeated or already expired), invalid 1",
    )
    assert (
        "sendgrid.csv: line 4: 'not-an-address' is not a full address"
        in (reports["sendgrid.csv"][2])
    )
    assert reports["mailgun.csv"][1].startswith("mailgun.csv: added 1, skipped 1")
    assert reports["ses.csv"][1].startswith("ses.csv: added 2, skipped 0")

    code, out, _ = await relay_cli("suppression", "list", "--json", config=cfg)
    entries = {e["address"]: e for e in json.loads(out)}
    assert sorted(entries) == [
        "bounced@example.org",
        "gone@example.net",
        "hard@example.com",
        "spam@example.com",
    ]
    bounced = entries["bounced@example.org"]
    assert bounced["reason"] == "import" and bounced["created_epoch"] == 1714557600
    assert bounced["detail"].startswith("550 5.1.1 The email account")
    assert bounced["source"] == "import:sendgrid.csv"
    assert entries["gone@example.net"]["detail"] == "No such user"
    assert entries["gone@example.net"]["created"] == "2024-05-14T10:00:00.000Z"
    assert entries["hard@example.com"]["reason"] == "hard_bounce"
    assert entries["spam@example.com"]["reason"] == "complaint"

    assert relay.suppression is not None
    await relay.suppression.refresh()
    assert (await rcpt_reply(relay, "spam@example.com")).startswith("550 5.1.1")


async def test_import_without_an_address_column_says_what_to_name_it(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay()
    (tmp_path / "x.csv").write_text("name,phone\nbob,123\n")
    code, _, err = await relay_cli(
        "suppression", "import", str(tmp_path / "x.csv"), config=cli_config(relay, tmp_path)
    )
    assert code == 1
    assert "no address column in the header (name, phone)" in err
    assert "email, address, recipient or EmailAddress" in err


def test_import_honours_expire_after_from_when_the_provider_recorded_it() -> None:
    now = 1_800_000_000.0
    config = SuppressionConfig(expire_after={"hard_bounce": parse_duration("30d")})  # type: ignore[dict-item]
    lines = [
        "EmailAddress,Reason,LastUpdateTime",
        f"old@example.com,BOUNCE,{now - 40 * 86400}",
        f"recent@example.com,BOUNCE,{now - 10 * 86400}",
        f"complaint@example.com,COMPLAINT,{now - 400 * 86400}",
    ]
    result = read_csv(lines, source="import:t", now=now, config=config)
    assert result.skipped == 1  # old: its 30 days are over
    by_address = {e.address: e for e in result.entries}
    assert by_address["recent@example.com"].expires == now + 20 * 86400
    assert by_address["complaint@example.com"].expires is None
    # --expires counts from now instead.
    result = read_csv(lines, source="import:t", now=now, config=config, expires="1d")
    assert [e.expires for e in result.entries] == [now + 86400] * 3


def test_created_formats() -> None:
    assert parse_created("1714557600") == 1714557600
    assert parse_created("1714557600123") == pytest.approx(1714557600.123)
    assert parse_created("2024-05-01T10:00:00Z") == 1714557600
    assert parse_created("2024-05-01 10:00:00") == 1714557600
    assert parse_created("Wed, 01 May 2024 10:00:00 +0000") == 1714557600
    assert parse_created("yesterday") is None
