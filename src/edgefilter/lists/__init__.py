"""List entries in memory (the index the call path reads) and the feed formats that fill them. Imports core."""
