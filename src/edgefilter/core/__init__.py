"""The domain and its settings: model, errors, durations, phone numbers, configuration. Imports nothing of ours."""
