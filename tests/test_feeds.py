"""feeds.py: every format clean, messy and hostile; what each line became and why."""

from __future__ import annotations

import random

import pytest

from edgefilter.core.numbers import strip_visual
from edgefilter.lists.feeds import MAX_LINE, FeedError, FeedOptions, Seen, decode, detect_format, fast_pattern, parse_feed, split_lines
from edgefilter.lists.index import Entry, parse_pattern

OPTS = FeedOptions(list_name="block", region="CN", source="t", categories=frozenset({"fraud", "marketing"}))


def run(text: str, fmt: str, **kw):
    opts = FeedOptions(**{**OPTS.__dict__, **kw})
    good, bad = {}, {}
    for no, item in parse_feed(text, fmt, opts):
        if isinstance(item, Entry):
            good.setdefault(no, []).append(item)
        else:
            bad[no] = item
    return good, bad


def texts(good):
    return {no: [e.pattern.text for e in es] for no, es in good.items()}


# -- decoding and detection ---------------------------------------------------------------
def test_decode_bom_utf16_gbk_latin1():
    assert decode("\ufeff+8613800138000\n".encode("utf-8")) == ("+8613800138000\n", "")
    text, note = decode("+8613800138000\n".encode("utf-16"))
    assert text == "+8613800138000\n" and "UTF-16" in note
    text, note = decode("13800138000,张三\n".encode("gbk"))
    assert text == "13800138000,张三\n" and "GBK" in note
    text, note = decode(b"+8613800138000\n\xff\xfe\xfd\x80\x81\n")
    assert text.startswith("+8613800138000\n") and ("latin-1" in note or "GBK" in note)


def test_split_lines_crlf_cr_and_unicode_separators():
    assert split_lines("a\r\nb\nc") == ["a", "b", "c"]
    assert split_lines("a\rb\r") == ["a", "b"]
    assert split_lines("a\u2028b\nc\n") == ["a\u2028b", "c"]  # line numbers agree with editors


@pytest.mark.parametrize(
    "name,text,fmt",
    [
        ("list.txt", "+8613800138000\n+86170*\n", "text"),
        ("list", "# comment\n+8613800138000\n013800138000\n", "text"),
        ("export.csv", "+8613800138000\n", "csv"),
        ("contacts.VCF", "", "vcf"),
        ("contacts", "BEGIN:VCARD\r\nFN:A\r\nEND:VCARD\r\n", "vcf"),
        ("feed", "number;category\n+8613800138000;fraud\n+8613800138001;fraud\n", "csv"),
        ("feed", "+8613800138000\tspam\n+8613800138001\tspam\n", "csv"),
        ("masks", "+4121560####\n", "text"),
    ],
)
def test_detect_format(name, text, fmt):
    assert detect_format(name, text) == fmt


# -- fast path agrees with the full parser ------------------------------------------------
def test_fast_pattern_agrees_with_parse_pattern():
    rnd = random.Random(6)
    samples = ["+8613800138000", "+4121560123", "+12125550123", "+442079460018", "+390612345678", "+4930123456",
               "008613800138000", "+79161234567", "+33612345678", "+61412345678", "+818012345678"]
    for _ in range(2000):
        cc = rnd.choice(["1", "7", "33", "39", "44", "49", "61", "81", "86", "852", "971", "880", "998"])
        samples.append("+" + cc + "".join(rnd.choice("0123456789") for _ in range(rnd.randint(6, 12))))
    checked = 0
    for raw in samples:
        fast = fast_pattern(strip_visual(raw), "CN")
        if fast is not None:
            assert fast == parse_pattern(raw, "CN"), raw
            checked += 1
    assert checked > 1000
    assert fast_pattern("+4402079460018", "GB") is None  # trunk 0 after the country code: full path
    assert fast_pattern("0044207946001", "US") is None  # 00 is not the international prefix in US


# -- text --------------------------------------------------------------------------------
def test_text_clean():
    good, bad = run("# spam list\n+8613800138000\n013800138001\n0086 13800138002\n+86170*\n+4121560####\n95588\n", "text")
    assert not bad
    assert texts(good) == {2: ["+8613800138000"], 3: ["+8613800138001"], 4: ["+8613800138002"], 5: ["+86170*"],
                           6: ["+4121560####"], 7: ["95588"]}
    assert good[2][0].list == "block" and good[2][0].source == "t"


def test_text_messy_separators_comments_crlf_bom():
    text = "\ufeff+86 (138) 0013-8000\r\n\r\n  +86.138.0013.8001  # from Bob\r\n\t# indented comment\r\n+86-170-*\r\n"
    good, bad = run(text, "text")
    assert not bad
    assert texts(good) == {1: ["+8613800138000"], 3: ["+8613800138001"], 5: ["+86170*"]}
    assert good[3][0].note == "from Bob"


def test_text_hostile_lines_are_refused_with_reasons():
    long = "1" * (MAX_LINE + 10)
    text = f"hello\n{long}\n+86*1*\n\x1b[31m+8613800138000\n+8613800138000\x00\n{'9' * 70}\n#123\n+8613800138009\n"
    good, bad = run(text, "text")
    assert texts(good) == {8: ["+8613800138009"]}
    assert set(bad) == {1, 2, 3, 4, 5, 6}  # line 7 '#123' is a comment
    assert "longer than" in bad[2] and long not in bad[2]
    assert "prefix rule" in bad[3]
    assert all(len(r) < 300 for r in bad.values())


def test_region_reads_national_forms():
    good, _ = run("0301234*\n030 1234567\n", "text", region="DE")
    assert texts(good) == {1: ["+49301234*"], 2: ["+49301234567"]}


# -- CSV ---------------------------------------------------------------------------------
def test_csv_header_number_category_name_label_columns():
    text = "Name,Phone,Category,Label\nAcme,+8613800138000,Fraud,robocall\n,013800138001,,\n"
    good, bad = run(text, "csv")
    assert not bad
    e = good[2][0]
    assert (e.pattern.text, e.category, e.note) == ("+8613800138000", "fraud", "Acme / robocall")
    assert (good[3][0].pattern.text, good[3][0].category) == ("+8613800138001", "")


def test_csv_default_category_and_unknown_category():
    good, bad = run("number,category\n+8613800138000,\n+8613800138001,bogus\n", "csv", category="marketing")
    assert good[2][0].category == "marketing"
    assert 3 in bad and "unknown category" in bad[3]


def test_csv_no_header_detects_number_column_and_delimiter():
    text = "1;spam caller;+8613800138000\n2;telemarketing;+8613800138001\n3;x;013800138002\n"
    good, bad = run(text, "csv")
    assert not bad
    assert texts(good) == {1: ["+8613800138000"], 2: ["+8613800138001"], 3: ["+8613800138002"]}


def test_csv_column_by_number_and_name():
    text = "home,work\n+8613800138000,+8613800138001\n"
    assert texts(run(text, "csv", column="work")[0]) == {2: ["+8613800138001"]}
    assert texts(run(text, "csv", column=1)[0]) == {2: ["+8613800138000"]}
    with pytest.raises(FeedError):
        list(parse_feed(text, "csv", FeedOptions(column="fax")))
    with pytest.raises(FeedError):
        list(parse_feed(text, "csv", FeedOptions(column="0")))


def test_csv_quoted_fields_crlf_bom_tabs_and_multiline_field():
    text = ('\ufeff"name"\t"number"\t"address"\r\n"Doe, John"\t"+86 138 0013 8000"\t"line1\r\nline2"\r\n'
            '"Roe"\t"+8613800138001"\t""\r\n')
    good, bad = run(text, "csv")
    assert not bad
    assert texts(good) == {2: ["+8613800138000"], 4: ["+8613800138001"]}
    assert good[2][0].note == "Doe, John"


def test_csv_hostile_unterminated_quote_long_line_and_short_rows():
    long = "x," * (MAX_LINE // 2 + 10)
    text = f'number,name\n"+8613800138000,unterminated\n+8613800138001,ok\n{long}\n,\n+8613800138002\n+8613800138003,"a"b\n'
    good, bad = run(text, "csv")
    assert texts(good) == {3: ["+8613800138001"], 6: ["+8613800138002"]}
    assert "quoted" in bad[2] and "longer than" in bad[4] and "quoted" in bad[7]


def test_csv_comment_rows_skipped():
    good, bad = run("# exported 2026-11-01\nnumber\n+8613800138000\n# end\n", "csv")
    assert not bad and texts(good) == {3: ["+8613800138000"]}


# -- vCard -------------------------------------------------------------------------------
VCF = (
    "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Alice\r\n  Smith\r\nTEL;TYPE=CELL:+86 138 0013\r\n 8005\r\n"
    "item1.TEL;type=pref:tel:+86-138-0013-8006;ext=1\r\nEMAIL:a@example.com\r\nEND:VCARD\r\n"
    "BEGIN:VCARD\r\nVERSION:2.1\r\nFN;ENCODING=QUOTED-PRINTABLE;CHARSET=UTF-8:=E5=BC=A0=E4=B8=89\r\n"
    "TEL;HOME:013800138007\r\nEND:VCARD\r\n"
)


def test_vcard_clean_with_folded_lines_and_quoted_printable():
    good, bad = run(VCF, "vcf", list_name="allow")
    assert not bad
    assert texts(good) == {5: ["+8613800138005"], 7: ["+8613800138006"], 13: ["+8613800138007"]}
    assert good[5][0].note == "Alice Smith" and good[5][0].list == "allow"
    assert good[13][0].note == "张三"


def test_vcard_hostile():
    text = ("garbage\nBEGIN:VCARD\nTEL:not a number\nTEL;TYPE=\"a:b\":+8613800138008\nBEGIN:VCARD\n"
            "TEL:+8613800138009\n" + "X-LONG:" + "y" * (MAX_LINE + 1) + "\nEND:VCARD\nEND:VCARD\nBEGIN:VCARD\nTEL:+8613800138010\n")
    good, bad = run(text, "vcf")
    assert texts(good) == {4: ["+8613800138008"], 6: ["+8613800138009"], 11: ["+8613800138010"]}
    assert set(bad) == {1, 3, 5, 7, 9, 11}


# -- duplicates --------------------------------------------------------------------------
def test_duplicates_in_national_international_and_00_forms_count_once():
    good, _ = run("+8613800138000\n013800138000\n008613800138000\n+86 138 0013 8000\n", "text")
    seen = Seen()
    firsts = [seen.first_line(no, e) for no, es in sorted(good.items()) for e in es]
    assert firsts == [None, 1, 1, 1]


def test_a_stray_carriage_return_inside_a_csv_line_costs_that_line_only():
    text = "number,name\n+8613800138000,a\n+8613800138001,b\rc\n+8613800138002,d\n"
    got = list(parse_feed(text, "csv", FeedOptions()))
    assert [(no, isinstance(item, str)) for no, item in got] == [(2, False), (3, True), (4, False)]
