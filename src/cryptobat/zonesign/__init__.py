"""Helpers of ``cryptobat signzone``: a fast master-file reader and key-file handling."""
