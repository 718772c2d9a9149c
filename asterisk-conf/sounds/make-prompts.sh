#!/usr/bin/env bash
# The appeal prompts (docs/actions.md "appeal"): Asterisk's core sounds have no words for "this
# number does not take your call", so these three are spoken by espeak-ng and converted by sox
# to 8 kHz mono GSM, the format of the core sounds. The .gsm files are shipped beside this script;
# run it again after changing a text (or to make another language: LANG_VOICE=de OUT=...).
#   apt-get install espeak-ng sox
# Install: copy the edgefilter/ folder into Asterisk's sounds directory, beside en/ (Debian:
# /usr/share/asterisk/sounds/edgefilter/). Asterisk finds a sound without a language folder there
# for every channel language: Playback(edgefilter/appeal-offer).
set -euo pipefail
cd "$(dirname "$0")"
VOICE="${LANG_VOICE:-en-us}"
OUT="${OUT:-edgefilter}"
mkdir -p "$OUT"
say() {  # name, text
    local wav
    wav=$(mktemp --suffix=.wav)
    espeak-ng -v "$VOICE" -s 150 -w "$wav" "$2"
    sox "$wav" -r 8000 -c 1 "$OUT/$1.gsm"
    rm -f "$wav"
    echo "$OUT/$1.gsm: $2"
}
say appeal-offer "This number does not take your call. If you think this is a mistake, press"
say appeal-speak "then, after the tone, say who you are, and why you call."
say appeal-reference "Thank you. Your appeal is recorded. Your reference number is"
