"""Localization: which entries of τ carry a skill — dataless top-k, streamed top-k, learned masks."""
