"""Generate the bundled preference data: plain answers preferred over convoluted ones.

    python upo/resources/make_preferences.py            # rewrites the three JSONL files here
    python upo/resources/make_preferences.py --seed 1 --out-dir /tmp/x

Every topic is an everyday how-to or "why" question with three short plain tips. A row's
chosen answer is two or three tips as short sentences; its rejected answer says the same
tips in one long sentence, with an inflated opener, long connectors and jargon words
swapped in for plain ones. So the designer objective (readability) separates the pair
while the content stays the same. Output is deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SEED = 0
ROWS_PER_TOPIC = 4
MAX_ROWS = 360
MAX_CHOSEN_CHARS = 200
MAX_REJECTED_CHARS = 300
CHAT_SAMPLE_ROWS = 10

# (task, tips): prompts read "How do I {task}?"; tips are imperative sentences.
HOW_TOPICS = [
    ("boil an egg", "Put the eggs in a pot of cold water.", "Bring it to a boil and cook for nine minutes.", "Cool the eggs in cold water before you peel them."),
    ("make a cup of tea", "Boil fresh water first.", "Steep the tea bag for three minutes.", "Take the bag out, then add milk if you like."),
    ("sleep better at night", "Go to bed at the same time every day.", "Keep your room dark and cool.", "Stop using screens an hour before bed."),
    ("save money on food", "Plan your meals for the week.", "Make a list and stick to it at the shop.", "Buy store brands when you can."),
    ("remove a coffee stain", "Blot the stain with a dry cloth right away.", "Rinse it from the back with cold water.", "Rub in a bit of soap, then wash it as usual."),
    ("keep houseplants alive", "Check the soil with your finger before you water.", "Water only when the top inch is dry.", "Give the plant bright light but not harsh sun."),
    ("learn a new language", "Practice a little every day.", "Learn the most common words first.", "Talk with real people as soon as you can."),
    ("write a good email", "Put the main point at the top.", "Keep it short and clear.", "Check names and dates before you send it."),
    ("study for an exam", "Start a few weeks early.", "Test yourself instead of just reading notes.", "Take short breaks every half hour."),
    ("change a flat tire", "Park on flat ground and turn on your hazard lights.", "Loosen the nuts a bit before you lift the car.", "Swap the tire, then tighten the nuts."),
    ("cook rice", "Rinse the rice until the water runs clear.", "Use two cups of water for each cup of rice.", "Simmer it with the lid on for eighteen minutes."),
    ("care for a cast iron pan", "Wash it with hot water and a soft brush.", "Dry it fully right away.", "Rub a thin coat of oil on it while it is warm."),
    ("wake up earlier", "Move your alarm ten minutes earlier each week.", "Put your alarm across the room.", "Get sunlight early in the morning."),
    ("lower my stress", "Take a short walk outside.", "Breathe in slowly, then breathe out even more slowly.", "Talk to a friend about what is on your mind."),
    ("fall asleep faster", "Read a paper book in bed.", "Keep the room a bit cool.", "Get up and do something calm if you cannot sleep."),
    ("start running", "Begin with short runs mixed with walking.", "Run at a pace where you can still talk.", "Add a few minutes each week."),
    ("stay hydrated", "Carry a water bottle with you.", "Drink a glass of water with each meal.", "Eat fruit and vegetables that hold lots of water."),
    ("pack for a trip", "Make a list a few days before you leave.", "Roll your clothes to save space.", "Put liquids in a small clear bag."),
    ("fix a slow computer", "Restart it first.", "Close programs you are not using.", "Delete large files you no longer need."),
    ("make a strong password", "Use a long phrase of four or more random words.", "Never use the same password twice.", "Keep your passwords in a password manager."),
    ("spot a phishing email", "Check the sender's full address.", "Do not click links that ask you to log in.", "Be wary of urgent demands for money."),
    ("back up my phone", "Turn on cloud backup in your settings.", "Plug in your phone and leave it on Wi-Fi overnight.", "Check that the last backup date is recent."),
    ("unclog a sink", "Pour a pot of boiling water down the drain.", "Use a plunger with a tight seal.", "Clean the trap under the sink if it is still slow."),
    ("get rid of fruit flies", "Throw out old fruit.", "Set out a small cup of vinegar with a drop of soap.", "Take out the trash often."),
    ("iron a shirt", "Start with the collar.", "Do the cuffs and sleeves next.", "Finish with the front and back."),
    ("wash a wool sweater", "Use cool water and a mild soap.", "Do not wring it out.", "Dry it flat on a towel."),
    ("keep bread fresh", "Store it in a bread box or paper bag.", "Do not put it in the fridge.", "Freeze slices you will not eat soon."),
    ("ripen an avocado", "Put it in a paper bag with a banana.", "Keep it at room temperature.", "Check it each day by pressing gently."),
    ("prepare for a job interview", "Read up on the company first.", "Practice answers to common questions out loud.", "Plan your route so that you arrive early."),
    ("ask for a raise", "List what you have done this year.", "Find out what your role pays elsewhere.", "Ask at a calm time, not in a rush."),
    ("make friends as an adult", "Join a club or class you enjoy.", "Show up to the same place often.", "Invite people to do small things with you."),
    ("be more productive at work", "Pick your three most important tasks each morning.", "Turn off alerts while you focus.", "Work in short blocks with breaks."),
    ("stop procrastinating", "Break the task into tiny steps.", "Work on it for just five minutes.", "Put your phone in another room."),
    ("take better photos with my phone", "Clean the lens first.", "Use natural light when you can.", "Hold the phone steady and tap to focus."),
    ("grow tomatoes", "Plant them in a sunny spot.", "Water deeply a few times a week.", "Tie the stems to a stake as they grow."),
    ("compost at home", "Mix green scraps with dry leaves.", "Keep the pile damp like a wrung sponge.", "Turn it every week or two."),
    ("teach a puppy to sit", "Hold a treat above its nose.", "Move the treat back so that its bottom goes down.", "Say sit and give the treat right away."),
    ("trim a dog's nails", "Use sharp clippers made for dogs.", "Cut a little at a time.", "Give a treat after each paw."),
    ("check my tire pressure", "Check when the tires are cold.", "Press the gauge firmly on the valve.", "Compare it to the number on the door sticker."),
    ("save for retirement", "Start early, even with small amounts.", "Take the full match if your job offers one.", "Use low cost index funds."),
    ("make a budget", "Write down what you earn each month.", "Track what you spend for a few weeks.", "Set limits for each type of spending."),
    ("pay off debt", "List all debts with their rates.", "Pay the minimum on all but one.", "Put extra money on the debt with the highest rate."),
    ("read more books", "Carry a book with you.", "Read ten pages before bed.", "Stop books you do not enjoy."),
    ("improve my handwriting", "Slow down.", "Hold the pen loosely.", "Copy a neat model for ten minutes a day."),
    ("memorize a speech", "Learn it one part at a time.", "Say it out loud many times.", "Use key words as cues, not the full text."),
    ("give a good presentation", "Open with a clear point.", "Use few words on each slide.", "Practice with a timer."),
    ("deal with a rude coworker", "Stay calm and polite.", "Keep notes of what happens.", "Talk to your manager if it goes on."),
    ("apologize well", "Say sorry without excuses.", "Name what you did wrong.", "Say how you will fix it."),
    ("help a friend who is sad", "Listen more than you talk.", "Do not rush to fix things.", "Check in on them a few days later."),
    ("keep a conversation going", "Ask open questions.", "Share a bit of your own story too.", "Notice small details they mention."),
    ("cook pasta", "Use a big pot of well salted water.", "Stir it early on so that it does not stick.", "Taste it a minute before the time on the box."),
    ("make scrambled eggs", "Beat the eggs with a pinch of salt.", "Cook them on low heat.", "Stir slowly and take them off while still soft."),
    ("bake bread", "Mix flour, water, yeast, and salt.", "Leave the dough to rise until it doubles.", "Bake it in a hot oven until the crust is brown."),
    ("sharpen a kitchen knife", "Soak the stone if it needs water.", "Hold the blade at a low, steady angle.", "Use light strokes on both sides."),
    ("freeze vegetables", "Blanch them in boiling water for two minutes.", "Cool them in ice water.", "Dry them and freeze them flat in bags."),
    ("store leftovers safely", "Cool food within two hours.", "Use shallow sealed boxes.", "Eat them within three or four days."),
    ("clean windows without streaks", "Use a mix of water and a little vinegar.", "Wipe with a dry microfiber cloth.", "Avoid cleaning in direct sun."),
    ("get rid of smells in the fridge", "Throw out old food.", "Wipe the shelves with warm soapy water.", "Leave an open box of baking soda inside."),
    ("organize a closet", "Take everything out first.", "Keep only what you wear.", "Group what is left by type."),
    ("declutter a room", "Start with one small area.", "Sort things into piles to keep, donate, and toss.", "Drop off the donations the same day."),
    ("paint a room", "Wash the walls and leave them to dry.", "Tape the edges and cover the floor.", "Use two thin coats instead of one thick one."),
    ("hang a picture", "Find a stud or use a wall anchor.", "Mark the spot at eye level.", "Use a level before you drive the nail."),
    ("reset my router", "Unplug it for thirty seconds.", "Plug it back in and wait two minutes.", "Call your provider if the light stays red."),
    ("speed up my home internet", "Move the router to a central, open spot.", "Keep it away from thick walls and metal.", "Restart it once in a while."),
    ("keep my kids safe online", "Keep devices in shared rooms.", "Talk with them about what they see.", "Use the parental settings on each device."),
    ("teach a child to ride a bike", "Lower the seat so that their feet touch the ground.", "Have them glide and push with their feet first.", "Add pedals once they can balance."),
    ("get more exercise", "Walk or bike for short trips.", "Take the stairs.", "Find a sport or class you enjoy."),
    ("stretch after a workout", "Hold each stretch for thirty seconds.", "Breathe slowly and do not bounce.", "Stretch the muscles you just used."),
    ("eat more vegetables", "Add a vegetable to every meal.", "Keep cut vegetables ready in the fridge.", "Try to fill half your plate with them."),
    ("drink less coffee", "Cut back by half a cup each week.", "Switch some cups to decaf or tea.", "Drink water when you feel tired."),
    ("quit biting my nails", "Keep your nails short.", "Use a bitter nail polish.", "Keep your hands busy with something else."),
    ("ease a headache", "Drink a glass of water.", "Rest in a dark, quiet room.", "Take a mild pain reliever if you need it."),
    ("treat a small cut", "Rinse it under running water.", "Press gently to stop the bleeding.", "Cover it with a bandage."),
    ("treat a mild sunburn", "Cool the skin with a damp cloth.", "Use aloe or a gentle lotion.", "Drink extra water and stay out of the sun."),
    ("write a cover letter", "Address it to a real person.", "Show how your skills match the job.", "Keep it under one page."),
    ("lower my phone bill", "Check what new customers pay.", "Call and ask for the retention team.", "Be polite but ready to cancel."),
    ("return an online order", "Check the return window first.", "Pack the item in its original box.", "Keep the tracking number until the refund arrives."),
    ("choose a ripe watermelon", "Look for a yellow spot on the bottom.", "Pick one that feels heavy.", "Tap it and listen for a deep sound."),
    ("make cold brew coffee", "Mix coarse coffee with cold water.", "Leave it in the fridge overnight.", "Strain it and add water to taste."),
    ("wash a car by hand", "Rinse off loose dirt first.", "Use one bucket for soap and one for rinse water.", "Dry it with a soft towel to avoid spots."),
    ("care for a new tattoo", "Wash it gently twice a day.", "Use a thin layer of plain lotion.", "Keep it out of the sun and do not scratch it."),
    ("get better at chess", "Solve a few puzzles every day.", "Play slower games and think before each move.", "Review your losses to find mistakes."),
    ("learn to type faster", "Keep your fingers on the home row.", "Do not look at the keys.", "Practice for ten minutes every day."),
    ("meditate", "Sit in a quiet spot.", "Focus on your breath.", "Gently bring your mind back when it wanders."),
    ("plan a small party", "Set a date and a guest list.", "Keep the food simple.", "Send invites two weeks ahead."),
]

# (question, facts): prompts read "Can you explain {question}?"; facts are statements.
WHY_TOPICS = [
    ("why the sky is blue", "Sunlight has all colors in it.", "Air scatters blue light more than red light.", "That blue light reaches your eyes from all over the sky."),
    ("why we have seasons", "The planet is tilted on its axis.", "Your half of the planet leans toward the sun in summer.", "In winter it leans away, so days are short and cold."),
    ("how vaccines work", "A vaccine gives your body a harmless part of a germ.", "Your body learns to make defenses against it.", "If the real germ shows up later, you fight it off fast."),
    ("why bread rises", "Yeast eats sugar in the dough.", "It gives off gas as it eats.", "The gas is trapped and puffs up the dough."),
    ("why ice floats", "Water expands when it freezes.", "Ice is less dense than liquid water.", "Less dense things float on denser ones."),
    ("how a fridge keeps food cold", "A liquid in the pipes takes heat from inside the fridge.", "A pump moves that heat to the coils at the back.", "The coils release the heat into the room."),
    ("why leaves change color in fall", "Leaves make less green pigment as days get short.", "Yellow and orange colors that were hidden start to show.", "Some trees also make new red pigments."),
    ("how a credit score works", "It is a number that shows how you handle debt.", "Paying on time raises it the most.", "Using a small part of your credit limit also helps."),
    ("why we yawn", "No one knows for sure.", "One idea is that yawning cools the brain.", "Yawns also spread between people who see them."),
    ("how interest on savings works", "The bank pays you a small share of your balance.", "That money is added to your account.", "Then you earn interest on the interest too."),
    ("why the ocean is salty", "Rain wears down rocks and carries salt to rivers.", "Rivers carry the salt to the sea.", "Water leaves the sea as vapor, but the salt stays."),
    ("how a rainbow forms", "Sunlight enters raindrops and bends.", "Each color bends by a different amount.", "The colors spread out and make an arc."),
    ("why cats purr", "Cats often purr when they are happy.", "They also purr when hurt or scared.", "Purring may calm them and speed healing."),
    ("how a microwave heats food", "It sends out waves that make water in food shake.", "The shaking makes heat.", "That heat cooks the food."),
    ("why we get goosebumps", "Tiny muscles pull our hairs up.", "In furry animals this traps warm air.", "In people it is mostly a leftover reflex."),
    ("how a plane stays in the air", "The wings push air down as the plane moves.", "The air pushes the wings up in return.", "The engines keep the plane moving fast enough."),
    ("why onions make you cry", "Cutting an onion breaks its cells.", "This releases a gas that reaches your eyes.", "Your eyes make tears to wash the gas away."),
    ("how a battery works", "A reaction inside pushes electrons out of one end.", "They flow through your device to the other end.", "The battery dies when the chemicals are used up."),
    ("why the moon seems to change shape", "The moon does not change shape.", "We see different parts of its sunlit side.", "This depends on where it is in its orbit."),
    ("why coffee keeps you awake", "Caffeine blocks a brain signal that tells you to rest.", "It takes twenty minutes or so to kick in.", "Its effect can last five hours or more."),
    ("how recycling works", "Trucks take sorted items to a plant.", "Machines and workers split them by type.", "Each type is cleaned and made into new goods."),
    ("why we need sleep", "During sleep the brain stores new memories.", "It gives the body time to repair itself.", "Without it, mood and focus suffer."),
]

HOW_PROMPTS = [
    "How do I {}?",
    "What is the best way to {}?",
    "Can you tell me how to {}?",
    "Any tips on how to {}?",
    "I want to {}. Where should I start?",
    "What should I do to {}?",
    "Give me quick advice on how to {}.",
]
WHY_PROMPTS = [
    "Can you explain {}?",
    "Explain {} in simple terms.",
    "I have always wondered {}. Can you explain?",
    "Tell me {}.",
    "Help me understand {}.",
]
CHAT_HOW_PROMPT = "Quick question: how do I {}?"
CHAT_SYSTEM = "You are a helpful assistant. Answer in plain, short sentences."

HOW_OPENERS = [
    "In order to optimally facilitate the successful accomplishment of this objective, it is advisable to",
    "With a view to maximizing the probability of a satisfactory outcome, one should endeavour to",
    "Notwithstanding individual circumstances, the recommended methodology necessitates that one",
    "Considering the multiplicity of relevant factors, it is considerably preferable to",
    "From an operational perspective, the optimal procedure would be to",
    "Prior to undertaking alternative approaches, it is fundamentally advisable to",
]
HOW_CONNECTORS = [
    ", and subsequently it is additionally recommended to",
    ", whereupon one ought to",
    ", in conjunction with an obligation to",
    ", while simultaneously endeavouring to",
    ", and it is furthermore beneficial to",
]
WHY_OPENERS = [
    "From a comprehensive scientific perspective, the fundamental explanation is that",
    "Considering the underlying physical mechanisms, it can be demonstrated that",
    "In accordance with established theoretical frameworks, it is understood that",
    "Notwithstanding widespread popular misconceptions, the primary determinant is that",
]
WHY_CONNECTORS = [
    ", and additionally it is observable that",
    ", whereas concurrently",
    ", which consequently signifies that",
    ", in conjunction with the circumstance that",
]
FINAL_CONNECTORS = [", and ultimately", ", and finally", ", and in conclusion"]
CLOSERS = ["", "", " in accordance with established best practices", " for maximal effectiveness"]

# Plain word or phrase -> inflated equivalent; longer phrases are listed first so they win.
JARGON = [
    ("make sure", "ensure"), ("a lot of", "a considerable quantity of"), ("lots of", "an abundance of"),
    ("as soon as", "at the earliest juncture at which"), ("every day", "on a daily basis"),
    ("each day", "on a daily basis"), ("right away", "without undue delay"), ("turn off", "deactivate"),
    ("turn on", "activate"), ("talk to", "confer with"), ("get up", "arise"),
    ("gives off", "emits"), ("give off", "emit"), ("show up", "materialize"), ("shows up", "materializes"),
    ("check in on", "re-establish contact with"), ("fast enough", "with sufficient velocity"), ("find out", "ascertain"), ("write down", "document"),
    ("so that", "in order that"), ("before you", "prior to the point at which you"),
    ("after you", "subsequent to the point at which you"), ("because", "due to the fact that"), ("before", "prior to"),
    ("after", "subsequent to"), ("use", "utilize"), ("uses", "utilizes"), ("using", "utilizing"),
    ("used", "utilized"), ("help", "facilitate"), ("helps", "facilitates"), ("start", "commence"),
    ("begin", "commence"), ("buy", "procure"), ("need", "require"), ("needs", "requires"),
    ("get", "obtain"), ("gets", "obtains"), ("keep", "maintain"), ("enough", "sufficiently"),
    ("check", "verify"), ("put", "position"), ("add", "incorporate"), ("wash", "cleanse"),
    ("stop", "discontinue"), ("pick", "select"), ("give", "provide"), ("gives", "provides"), ("show", "demonstrate"), ("shows", "demonstrates"),
    ("fix", "remediate"), ("find", "locate"), ("often", "frequently"), ("first", "initially"),
    ("then", "subsequently"), ("slowly", "in a gradual manner"), ("gently", "with considerable delicacy"),
    ("big", "substantial"), ("small", "diminutive"), ("tiny", "infinitesimal"), ("short", "abbreviated"),
    ("if", "in the event that"), ("when", "at such time as"), ("while", "whilst"),
    ("people", "individuals"), ("part", "component"), ("parts", "components"),
    ("simple", "uncomplicated"), ("soon", "in the near future"), ("also", "additionally"),
    ("money", "financial resources"), ("food", "comestibles"), ("try", "endeavour"), ("talk", "communicate"), ("plan", "strategize"),
    ("learn", "internalize"), ("more than", "to a greater extent than"), ("has", "possesses"),
    ("moves", "transfers"), ("reaches", "attains"), ("breaks", "disrupts"), ("cools", "reduces the temperature of"),
    ("raises", "elevates"), ("pays", "remunerates"), ("mostly", "predominantly"), ("many", "numerous"),
    ("enters", "penetrates"), ("bends", "undergoes refraction"), ("repair", "rehabilitate"),
    ("happy", "in a state of contentment"), ("scared", "apprehensive"), ("blocks", "inhibits"),
    ("last", "persist"), ("split", "segregate"), ("sends out", "emits"), ("shake", "oscillate"),
    ("traps", "sequesters"), ("learns", "acquires the capacity"), ("fight it off", "neutralize it"),
    ("different", "heterogeneous"), ("spread", "propagate"), ("wears down", "erodes"),
]
_JARGON_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(plain) for plain, _ in sorted(JARGON, key=lambda p: -len(p[0]))) + r")\b"
)
_JARGON_MAP = dict(JARGON)


def jargonize(sentence: str) -> str:
    """A plain sentence as a lower-case clause with inflated words swapped in."""
    clause = sentence.rstrip(".!?")
    clause = clause[0].lower() + clause[1:]
    return _JARGON_PATTERN.sub(lambda match: _JARGON_MAP[match.group(1)], clause)


def plain_answer(tips: list[str]) -> str:
    return " ".join(tips)


def convoluted_answer(tips: list[str], kind: str, rng: random.Random) -> str:
    """One long sentence; the shortest fitting opener is used only when needed to fit."""
    openers = HOW_OPENERS if kind == "how" else WHY_OPENERS
    connectors = HOW_CONNECTORS if kind == "how" else WHY_CONNECTORS
    clauses = [jargonize(tip) for tip in tips]
    for _ in range(50):
        body = clauses[0]
        if len(clauses) == 3:
            body += f", {clauses[1]}{rng.choice(FINAL_CONNECTORS)} {clauses[2]}"
        else:
            body += f"{rng.choice(connectors)} {clauses[1]}"
        closer = rng.choice(CLOSERS) if kind == "how" else ""
        text = f"{rng.choice(openers)} {body}{closer}."
        if len(text) <= MAX_REJECTED_CHARS:
            return text
    raise ValueError(f"no convoluted answer under {MAX_REJECTED_CHARS} chars for {tips}")


def _tip_choices(tips: tuple[str, ...], rng: random.Random) -> list[list[str]]:
    """Four selections of the three tips, kept in their given order: three pairs and all three."""
    pairs = [[tips[0], tips[1]], [tips[1], tips[2]], [tips[0], tips[2]]]
    triple = list(tips)
    choices = pairs + [triple]
    rng.shuffle(choices)
    return choices


def topic_rows(kind: str, subject: str, tips: tuple[str, ...], rng: random.Random) -> list[dict]:
    templates = rng.sample(HOW_PROMPTS if kind == "how" else WHY_PROMPTS, ROWS_PER_TOPIC)
    rows = []
    for template, selection in zip(templates, _tip_choices(tips, rng)):
        chosen = plain_answer(selection)
        try:
            rejected = convoluted_answer(selection, kind, rng)
        except ValueError:
            selection = selection[:2]  # a triple that cannot fit falls back to a pair
            chosen, rejected = plain_answer(selection), convoluted_answer(selection, kind, rng)
        if len(chosen) > MAX_CHOSEN_CHARS:
            selection = selection[:2]
            chosen, rejected = plain_answer(selection), convoluted_answer(selection, kind, rng)
        rows.append({"prompt": template.format(subject), "chosen": chosen, "rejected": rejected})
    return rows


def build_rows(seed: int = DEFAULT_SEED) -> list[dict]:
    """All preference rows, shuffled, capped at MAX_ROWS, prompts unique."""
    rng = random.Random(seed)
    rows = []
    for task, *tips in HOW_TOPICS:
        rows += topic_rows("how", task, tuple(tips), rng)
    for question, *tips in WHY_TOPICS:
        rows += topic_rows("why", question, tuple(tips), rng)
    rng.shuffle(rows)
    rows = rows[:MAX_ROWS]
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == len(prompts), "prompts must be unique"
    return rows


def build_chat_rows(seed: int = DEFAULT_SEED) -> list[dict]:
    """A few rows in TRL's conversational format (lists of role/content messages)."""
    rng = random.Random(seed + 1)
    rows = []
    for task, *tips in rng.sample(HOW_TOPICS, CHAT_SAMPLE_ROWS):
        selection = list(tips[:2])
        prompt = [{"role": "user", "content": CHAT_HOW_PROMPT.format(task)}]
        if len(rows) % 2 == 0:  # half the rows carry a system message, as real chat data does
            prompt.insert(0, {"role": "system", "content": CHAT_SYSTEM})
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": plain_answer(selection)}],
            "rejected": [{"role": "assistant", "content": convoluted_answer(selection, "how", rng)}],
        })
    return rows


def conversational(rows: list[dict]) -> list[dict]:
    """The same rows in TRL's conversational format: the prompt a user message, each response an assistant
    message (what an instruct model's chat template renders)."""
    return [{"prompt": [{"role": "user", "content": row["prompt"]}],
             "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows]


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_outputs(argv: list[str] | None, description: str, build) -> None:
    """The generators' command line: ``--seed``, ``--out-dir``; ``build(seed)`` gives ``{file name: rows}``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        (args.out_dir / name).write_text(to_jsonl(rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {args.out_dir / name}")


def main(argv: list[str] | None = None) -> None:
    write_outputs(argv, __doc__.splitlines()[0], lambda seed: {
        "preferences.jsonl": build_rows(seed),
        "preferences_conversational.jsonl": conversational(build_rows(seed)),
        "preferences_chat_sample.jsonl": build_chat_rows(seed),
    })


if __name__ == "__main__":
    main()
