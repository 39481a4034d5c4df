"""Data: training sets in any format (datasets), rows as tokens with the prompt/response boundary
(examples), and behaviour rules on text (detect)."""
