"""A Python labeling function for the BBC example: `text -> label | None` (None abstains)."""
import re

MONEY = re.compile(r"(?:[$£€]\s?\d[\d,.]*\s?(?:bn|m|billion|million)?|\b\d[\d,.]*\s?(?:bn|billion|million)\b)",
                   re.IGNORECASE)


def money_amounts(text: str):
    """business when an article quotes at least three sums of money; otherwise no opinion."""
    return "business" if len(MONEY.findall(text)) >= 3 else None
