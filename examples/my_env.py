"""A user's environment for `tether grpo env=examples/my_env.py:GuessNumber`: the model guesses the row's
`secret` (0-99) as `<guess>N</guess>` and is told "higher" or "lower" until it finds it or runs out of turns."""


class GuessNumber:
    stop = ["</guess>"]  # a turn ends when the model closes its guess
    max_turns = 6

    def __init__(self, bonus_per_turn_left: float = 0.1):
        self.bonus = bonus_per_turn_left
        self.turns = 0
        self.secret = 0

    def reset(self, row: dict) -> str | None:
        self.secret = int(row["secret"])  # every column of the dataset row is here
        return None  # nothing to add after the prompt

    def step(self, text: str) -> tuple[str | None, float | None, bool]:
        self.turns += 1
        body = text.rsplit("<guess>", 1)[-1].removesuffix("</guess>").strip()
        if not body.isdigit():  # no (readable) guess: the episode ends unrewarded
            return None, 0.0, True
        guess = int(body)
        if guess == self.secret:
            return None, 1.0 + self.bonus * (self.max_turns - self.turns), True
        hint = "higher" if guess < self.secret else "lower"
        return f" {hint} ", None, False  # observation tokens: context for the next turn, never trained on
