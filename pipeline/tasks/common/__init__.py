"""What several tasks share: initial weights (``weights``), the embedded digit-scene generator
(``scenes``) and the letterbox geometry (``letterbox``)."""
