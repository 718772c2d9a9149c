import textwrap

import pytest

from edgefilter.core.config import dump, load_settings, settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import Action


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_alone_are_valid_and_have_the_documented_keys():
    s = load_settings(None, use_default_paths=False)
    assert s.agi.listen == ("127.0.0.1", 4573)
    assert s.store.path == "var/edgefilter.db"
    assert s.default_region == "CN"
    assert s.screen.budget == pytest.approx(0.3)
    assert s.screen.on_error is Action.ALLOW
    assert s.screen.mode == "enforce"


def test_layering_admin_file_then_confd_in_sorted_order(tmp_path):
    cfg = write(tmp_path / "edgefilter.toml", """
        [numbers]
        default_region = "DE"
        [thresholds]
        tag = 2.0
    """)
    write(tmp_path / "conf.d" / "20-late.toml", "[thresholds]\ntag = 4.0\n")
    write(tmp_path / "conf.d" / "10-early.toml", "[thresholds]\ntag = 1.0\n[screen]\nbudget = \"150ms\"\n")
    s = load_settings(cfg)
    assert s.default_region == "DE"
    assert s.thresholds[Action.TAG] == 4.0  # 20-late wins over 10-early and the admin file
    assert s.screen.budget == pytest.approx(0.15)
    assert s.sources[-2:] == (str(tmp_path / "conf.d" / "10-early.toml"), str(tmp_path / "conf.d" / "20-late.toml"))
    # a rule weight overridden key by key keeps the rest of the rule
    write(tmp_path / "conf.d" / "30-rule.toml", "[rules.CLI_WITHHELD]\nweight = 9.0\n")
    s = load_settings(cfg)
    assert s.rules["CLI_WITHHELD"].weight == 9.0 and s.rules["CLI_WITHHELD"].group == "cli"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[agi]\nlisten_on = \"x\"\n", "unknown key 'listen_on' in [agi] (did you mean 'listen'?)"),
        ("[screne]\nbudget = \"1s\"\n", "unknown table [screne] (did you mean 'screen'?)"),
        ("[screen]\nbudget = 300\n", "[screen] budget: expected a duration string"),
        ("[screen]\nbudget = \"300 parsecs\"\n", "invalid duration '300 parsecs'"),
        ("[screen]\non_error = \"maybe\"\n", "unknown action 'maybe'"),
        ("[numbers]\ndefault_region = \"XX\"\n", "'XX' is not an ISO 3166 region"),
        ("[thresholds]\nchallenge = 2.0\n", "thresholds must ascend"),
        ("[agi]\nlisten = \"localhost\"\n", "expected \"host:port\""),
        ("[rules.CLI_WITHHLD]\nweight = 1.0\n", "unknown rule (did you mean 'CLI_WITHHELD'?)"),
        ("[rules.CLI_WITHHELD]\nwieght = 1.0\n", "unknown key 'wieght' in [rules.CLI_WITHHELD] (did you mean 'weight'?)"),
        ("[rules.NAME_X]\nweight = 1.0\nname_pattern = \"(\"\n", "invalid regular expression"),
        ("[rules.CLI_WITHHELD]\ngroup = \"nope\"\n", "unknown group 'nope'"),
        ("[policies.sales]\nschedule = \"ofice\"\n", "unknown schedule 'ofice'"),
        ("[policies.sales]\nweights = { CLI_WITHELD = 1 }\n", "unknown rule 'CLI_WITHELD'"),
        ("[schedules.x]\ndays = [\"funday\"]\n", "unknown day 'funday'"),
        ("[schedules.x]\nhours = [\"9-17\"]\n", "expected \"HH:MM-HH:MM\""),
        ("[screen]\ntag_text = \"a\\\"b\"\n", "no quotes"),
        ("[screen]\ntimezone = \"Mars/Olympus\"\n", "unknown time zone"),
        ("[agi\nlisten=1", "TOML syntax error"),
    ],
)
def test_each_mistake_names_file_key_and_suggestion(tmp_path, text, needle):
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert needle in str(exc.value)
    assert str(cfg) in str(exc.value)


def test_error_in_confd_names_that_file(tmp_path):
    cfg = write(tmp_path / "edgefilter.toml", "")
    bad = write(tmp_path / "conf.d" / "50-bad.toml", "[log]\nlevel = \"loud\"\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_settings(cfg)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_env_var_and_default_path(tmp_path, monkeypatch):
    cfg = write(tmp_path / "x.toml", "[numbers]\ndefault_region = \"US\"\n")
    monkeypatch.setenv("EDGEFILTER_CONFIG", str(cfg))
    assert load_settings(None).default_region == "US"
    monkeypatch.delenv("EDGEFILTER_CONFIG")
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "edgefilter.toml", "[numbers]\ndefault_region = \"GB\"\n")
    assert load_settings(None).default_region == "GB"


def test_dump_round_trips(tmp_path):
    s = settings_from_dict({"thresholds": {"tag": 2.5}, "policies": {"sales": {"match_did": ["+862161234567"], "actions": {"tag": "voicemail"}}}})
    out = tmp_path / "dumped.toml"
    out.write_text(dump(s))
    again = load_settings(out)
    assert again.thresholds == s.thresholds
    assert again.policies[0].actions == {Action.TAG: Action.VOICEMAIL}
