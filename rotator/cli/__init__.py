"""The ``rotator`` command: argument parsing, one module per command group, and the
text it prints. It is the top layer and may import every other part of rotator.
"""
