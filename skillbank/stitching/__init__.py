"""Stitching: skills applied to and removed from a live model, exactly; overlap rules, heads, switching, export."""
