"""The decision: signals, behaviour and its memory, policies, scoring, the screener. Imports core, lists, store."""
