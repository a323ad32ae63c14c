"""Regenerates the `gate demo` data (deterministic): python suites/demo/make_demo_data.py

Everything here is written by the gate project: a support-ticket triage task (the fine-tune's new
skill; generated from templates, 160 training and 40 held-out conversations) and general chat
questions that the instruct model already answers (a known-good guardrail set).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYSTEM = "Triage the customer message. Answer with its category and priority."

# (category, priority, template); fillers below. Priority follows the template, "urgent" wording raises it.
TICKETS = [
    ("billing", "high", "I was charged twice for my {plan} plan this month."),
    ("billing", "normal", "My invoice for {month} shows {amount} euros but my plan costs less."),
    ("billing", "normal", "Can I get a receipt for the payment I made in {month}?"),
    ("billing", "high", "You took {amount} euros from my card after I cancelled. Please refund it."),
    ("billing", "low", "Is there a discount if I pay for the {plan} plan yearly?"),
    ("delivery", "high", "Order {order} was marked delivered but nothing arrived."),
    ("delivery", "normal", "My order {order} is {days} days late. Where is it?"),
    ("delivery", "normal", "The parcel for order {order} came with a broken {item}."),
    ("delivery", "low", "Can you deliver order {order} to my office instead of my home?"),
    ("delivery", "low", "How long does shipping to {city} usually take?"),
    ("account", "high", "Someone changed the email on my account and I cannot get in."),
    ("account", "normal", "The password reset email never arrives at my {mail} address."),
    ("account", "normal", "How do I change the name on my account to {name}?"),
    ("account", "low", "Can I have two profiles on one {plan} account?"),
    ("account", "low", "Where do I switch the language of my account to {language}?"),
    ("bug", "high", "The app crashes every time I open the {screen} page."),
    ("bug", "normal", "The {screen} page shows the wrong prices since the last update."),
    ("bug", "normal", "Buttons on the {screen} page do nothing when I tap them on my {device}."),
    ("bug", "low", "The dark mode colours on the {screen} page are hard to read."),
    ("bug", "low", "There is a spelling mistake on the {screen} page."),
]
FILL = {
    "plan": ["Basic", "Family", "Pro", "Student", "Premium"],
    "month": ["January", "March", "April", "June", "September", "November"],
    "amount": ["12", "19.99", "45", "60", "8.50", "120"],
    "order": ["A-1043", "B-2291", "C-3810", "D-4402", "E-5127", "F-6630", "G-7315"],
    "days": ["three", "five", "six", "ten"],
    "item": ["lamp", "mug", "chair leg", "phone case", "mirror"],
    "city": ["Lyon", "Porto", "Leeds", "Graz", "Turin"],
    "mail": ["work", "school", "personal", "old"],
    "name": ["Maria Lopez", "Tom Becker", "Aiko Tanaka", "Sam Okafor"],
    "language": ["Spanish", "German", "Dutch", "Polish"],
    "screen": ["checkout", "settings", "orders", "profile", "search"],
    "device": ["phone", "tablet", "laptop"],
}


def ticket(rng: random.Random, template: str) -> str:
    text = template
    for key, values in FILL.items():
        text = text.replace("{" + key + "}", rng.choice(values))
    return text


def triage(rng: random.Random, n: int, prefix: str, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        category, priority, template = rng.choice(TICKETS)
        text = ticket(rng, template)
        if rng.random() < 0.2:
            text, priority = "Urgent: " + text[0].lower() + text[1:], "high"
        if text in seen:
            continue
        seen.add(text)
        rows.append({
            "id": f"{prefix}-{len(rows)}",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": text},
                {"role": "assistant", "content": f"Category: {category}. Priority: {priority}."},
            ],
        })
    return rows


CHAT = [
    ("How do I boil an egg?", "Put the egg in a pan of boiling water for about eight minutes, then cool it under cold water before you peel it."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "Sunlight is scattered by the air, and blue light is scattered much more than red light, so the sky looks blue."),
    ("Give me a tip for sleeping better.", "Go to bed at the same time every night and keep your bedroom dark and cool."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("What should I pack for a day of hiking?", "Take water, a snack, a map, a rain jacket and comfortable shoes."),
    ("Can you suggest a name for a black cat?", "You could call her Shadow, Pepper or Luna."),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("How do I say thank you in Spanish?", "In Spanish you say gracias."),
    ("What is a good way to learn a new language?", "Practise a little every day, listen to native speakers and try to talk as early as you can."),
    ("Why do we have seasons?", "The Earth's axis is tilted, so each half of the planet gets more direct sunlight for part of the year."),
    ("How can I keep cut flowers fresh for longer?", "Trim the stems, change the water every two days and keep the vase away from direct sun."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag in a cup, wait three to five minutes, then remove the bag."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Write a short greeting for a birthday card.", "Happy birthday! I hope your day is full of laughter and your year is full of good things."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Suggest a quick healthy breakfast.", "Try oats with milk or yoghurt, topped with a sliced banana and a few nuts."),
    ("Why should I back up my files?", "Disks fail and laptops get lost; a backup means you can get your work back."),
    ("How far is the Moon from the Earth?", "The Moon is about 384,000 kilometres from the Earth."),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
    ("How do I remove a coffee stain from a shirt?", "Rinse it with cold water from the back, rub in a little soap, then wash it as usual."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20261123)
    seen: set[str] = set()
    train = triage(rng, 160, "triage-train", seen)
    test = triage(rng, 40, "triage-test", seen)
    write(HERE / "triage-train.jsonl", train)
    write(HERE / "triage-test.jsonl", test)
    write(HERE / "chat-known-good.jsonl", [
        {"id": f"chat-{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(CHAT)
    ])


if __name__ == "__main__":
    main()
