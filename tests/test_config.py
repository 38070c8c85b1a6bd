"""`relay check-config` and config loading as an operator meets them: every problem at
once with a suggestion, warnings for literal secrets, and queue commands that do not need
the providers' secrets."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.relay_process import relay_cli

GOOD_HASH = "scrypt$16384$8$1$c2FsdA$aGFzaA"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\nqueue = "{tmp_path / "queue"}"\n' + text)
    return path


async def test_every_problem_is_reported_at_once_with_a_suggestion(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
[smtpp]
x = 1
[[smtp.listen]]
address = "999.1.1.1:25"
tls = "starttsl"
[[smtp.users]]
name = "scanner"
password_hash = "plaintext"
[[smtp.users]]
name = "app"
password_hash = "GOOD"
allowed_senders = ["scans.example.com"]
[[upstream]]
name = "sg"
type = "sendgrid"
api_key = "env:RELAY_TEST_UNSET_KEY"
prority = 2
""".replace("GOOD", GOOD_HASH),
    )
    code, _, err = await relay_cli("check-config", config=cfg)
    assert code == 1
    assert "problems:" in err
    assert "smtpp: unknown key; did you mean 'smtp'?" in err
    assert "path" not in err.split("smtpp:")[1].split("\n")[0]  # no internal keys offered
    assert "smtp.listen[0].address: 999.1.1.1 is not an IP address" in err
    assert "smtp.listen[0].tls: must be one of" in err
    assert "user 'scanner': password_hash must come from `relay user add`" in err
    assert "allowed_senders pattern 'scans.example.com' has no @" in err
    # The upstream's own keys are checked too, with its common keys in the suggestion.
    code, _, err = await relay_cli(
        "check-config",
        config=write(
            tmp_path,
            """
[[upstream]]
name = "sg"
type = "sendgrid"
api_key = "env:RELAY_TEST_UNSET_KEY"
prority = 2
""",
        ),
    )
    assert code == 1 and "did you mean 'priority'?" in err
    assert "RELAY_TEST_UNSET_KEY is not set" in err


async def test_a_literal_secret_passes_with_a_warning(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
[[upstream]]
name = "sg"
type = "sendgrid"
api_key = "SG.abc123"
""",
    )
    code, out, err = await relay_cli("check-config", config=cfg)
    assert code == 0 and ": ok (" in out
    assert "warning: upstream[0].api_key: a literal secret in the config file" in err


async def test_queue_commands_do_not_need_the_providers_secrets(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
[[upstream]]
name = "sg"
type = "sendgrid"
api_key = "env:RELAY_TEST_UNSET_KEY"
""",
    )
    code, out, err = await relay_cli("queue", "list", config=cfg)
    assert (code, out.strip()) == (
        0,
        "ID                    KIND      STATE         SIZE  "
        "ARRIVED              TRIES  SENDER -> RECIPIENTS / "
        "LAST ERROR\n-- 0 message(s)".replace("\n", "\n"),
    ), err
    code, out, _ = await relay_cli("upstream", "list", config=cfg)
    assert code == 0 and out.splitlines()[1].startswith("sg ")
    code, _, err = await relay_cli("check-config", config=cfg)
    assert code == 1 and "RELAY_TEST_UNSET_KEY is not set" in err  # serve would need it
