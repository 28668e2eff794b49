"""What every stage shares: the configuration machinery, distributed communication, errors,
progress, tracking, safe loading, text and chat windows, held-out metrics.
"""
