"""Documents by index: reading text sources, index ranges, which documents were held out."""
