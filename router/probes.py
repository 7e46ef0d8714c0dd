"""Hand-written prompts unlike any corpus item: how the router does on what users actually type.

The router is trained on generated questions, dialogue openings, dictionary and factbook entries,
and code signatures. These probes are phrased differently on purpose (short questions, requests,
lower case, no template), 12 per domain in ``PROBES`` and 15 in ``HELDOUT``. They are never used
for training; the report gives the accuracy on them beside the in-distribution test prompts.
Neither set is independent: the failures on ``PROBES`` shaped the rephrasing frames of
``training.data.prompt_views``, and ``HELDOUT`` repeats many of their topics almost word for word
("capital of Australia", "binary search", "ephemeral"), so both flatter the router.
"""

from __future__ import annotations

from router.domains import DOMAINS

PROBES: dict[str, tuple[str, ...]] = {
    "math": (
        "What is 12 + 30?",
        "how much is 7 times 8",
        "Compute 144 / 12.",
        "What's the greatest common divisor of 18 and 24?",
        "If I have 3 apples and buy 5 more, how many apples do I have?",
        "Solve for x: 2x + 3 = 11",
        "Is 91 a prime number?",
        "Convert 255 to binary.",
        "What is 15% of 80?",
        "A train travels 60 km per hour for 3 hours. How far does it go?",
        "Simplify the fraction 36/48.",
        "what's 2 to the power of 10",
    ),
    "reasoning": (
        "Alice says Bob is lying. Bob says Carol is lying. Carol says both are lying. Who tells the truth?",
        "Sort these words alphabetically: pear, apple, mango, kiwi",
        "How many times does the letter r appear in strawberry?",
        "Spell the word 'planet' backwards.",
        "Place 4 queens on a 4x4 board so that none attack each other.",
        "Find the shortest path from A to D in the grid below.",
        "Move the tower of 3 disks from peg 1 to peg 3.",
        "Using 3, 5, 7 and 9 once each, make 24.",
        "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
        "Count the islands in this map: 1 1 0 / 0 1 0 / 0 0 1",
        "Which course must be taken first if B requires A and C requires B?",
        "Sort the numbers 42, 7, 19, 3 in descending order.",
    ),
    "conversation": (
        "hi there, how are you doing today?",
        "Good morning!",
        "What's your favourite movie?",
        "I had a rough day at work.",
        "Do you like music?",
        "tell me a little about yourself",
        "Thanks, that was really helpful!",
        "Are you a robot?",
        "What did you do this weekend?",
        "I'm bored, let's chat.",
        "Do you have any pets?",
        "See you later!",
    ),
    "knowledge": (
        "What is the capital of Australia?",
        "Define the word 'ephemeral'.",
        "What is the population of Brazil?",
        "What language is spoken in Portugal?",
        "Which continent is Kenya in?",
        "What does photosynthesis mean?",
        "What currency does Japan use?",
        "meaning of serendipity",
        "What is the climate of Norway like?",
        "Who is the chief of state of France?",
        "What is a synonym for happy?",
        "What are the natural resources of Chile?",
    ),
    "code": (
        "Write a Python function that reverses a string.",
        "def is_palindrome(s):",
        "How do I read a JSON file in Python?",
        "import os\nfor name in os.listdir('.'):",
        "Fix this: for i in range(10) print(i)",
        "class Stack:\n    def __init__(self):",
        "Write a function to merge two sorted lists.",
        "What does the zip() builtin do?",
        "return sorted(items, key=lambda x: x[1])",
        "How do I catch an exception in Python?",
        "Implement binary search over a sorted list.",
        "with open('data.txt') as f:",
    ),
}
assert set(PROBES) == set(DOMAINS)

# A second set in the same style; it shares many topics with PROBES, so it is not independent of it.
HELDOUT: dict[str, tuple[str, ...]] = {
    "math": (
        "whats 17% of 240",
        "If a train leaves at 9:45 and the trip takes 2 hours 50 minutes, what time does it arrive?",
        "convert 0x3F to decimal pls",
        "is 221 prime?",
        "Solve for x: 3x - 7 = 2x + 11",
        "can you add 3/8 and 5/12 and simplify the answer",
        "next number in the sequence 2, 6, 12, 20, 30, ?",
        "how many days between march 3 and july 19 2024",
        "Sarah has 4 times as many marbles as Tom. Together they have 85. How many does Tom have?",
        "1011011 binary to base 10",
        "I need the LCM of 18 and 42",
        "how many seconds are in 3.5 hours",
        "A shirt costs $48 after a 20% discount, what was the original price?",
        "whats 384 divided by 16 times 7",
        "Convert 5 miles to kilometers, round to 2 decimals",
    ),
    "reasoning": (
        "Knights always tell the truth, knaves always lie. A says 'B is a knave.' B says 'A and I are both knights.' Who is what?",
        "sort these alphabetically: pear, apple, mango, kiwi, banana",
        "how many r's are in strawberry",
        "spell elephant backwards",
        "Can you make 24 using 3, 8, 8, 1? each number once",
        "solve tower of hanoi with 4 disks and list every move",
        "place 6 queens on a 6x6 board so none attack each other",
        "If it rains, the ground is wet. The ground is not wet. What can we conclude?",
        "sort descending: 42, 7, 19, 88, 3, 56",
        "Shortest path from S to E in this grid (# = wall): S.#. / ..#. / #... / ...E",
        "Tasks: A needs B and C done first, C needs D, B needs D. give me a valid order",
        "3 houses in a row. The green house is directly right of the red one. The blue house is on the far left. The dog owner lives in the middle. What color is the dog owner's house?",
        "solve this 4x4 sudoku: 1 _ _ 4 / _ 4 1 _ / _ 1 4 _ / 4 _ _ 1",
        "count the vowels in onomatopoeia",
        "Is this valid: all cats are mammals, some mammals are black, therefore some cats are black?",
    ),
    "conversation": (
        "hey how's it going",
        "good morning!! :)",
        "what's your favorite movie?",
        "I'm feeling kinda down today, my dog is sick",
        "are you a real person or a bot",
        "who made you?",
        "thanks so much, you've been really helpful",
        "do you ever get bored talking to people all day?",
        "i just got promoted at work!!! so excited",
        "what do you think about pineapple on pizza honestly",
        "tell me a bit about yourself",
        "ugh mondays am i right",
        "Can we just chat for a bit? I'm lonely tonight",
        "do u have feelings",
        "bye, talk to you tomorrow",
    ),
    "knowledge": (
        "what is the capital of australia",
        "population of nigeria?",
        "What languages are spoken in Switzerland?",
        "which currency does Japan use",
        "whats the climate like in Mongolia",
        "What kind of government does Saudi Arabia have?",
        "main exports of chile's economy",
        "define 'ephemeral'",
        "what does ubiquitous mean",
        "give me a synonym for happy",
        "what is RAM",
        "Can you explain what a compiler does?",
        "Which countries border Bolivia?",
        "meaning of the word serendipity pls",
        "whats the diffrence between a CPU and a GPU",
    ),
    "code": (
        "write a python function to reverse a linked list",
        "How do I read a CSV file in Python?",
        "TypeError: 'NoneType' object is not subscriptable - what does this mean",
        "pls give me a python snippet that removes duplicates from a list but keeps the order",
        "implement binary search in python",
        "what does collections.Counter do",
        "why does my code print None? def f(x): print(x*2) and then print(f(3))",
        "python list comprehension to get squares of even numbers from 1 to 20",
        "I need a function that checks if a string is a palindrome, ignoring spaces and case",
        "how to sort a dict by value in python",
        "IndentationError: unexpected indent, how do i fix",
        "write a decorator that times how long a function takes",
        "Can you show me how to use itertools.groupby?",
        "implement dijkstra's algorithm in python using heapq",
        "whats the difference between append and extend for python lists",
    ),
}
assert set(HELDOUT) == set(DOMAINS)


def probe_examples(heldout: bool = False) -> list[tuple[str, str]]:
    """``(prompt, domain)`` for every probe (``heldout``: the second set), in a fixed order."""
    probes = HELDOUT if heldout else PROBES
    return [(p, d) for d in DOMAINS for p in probes[d]]
