"""Write examples/data/elements.jsonl: one prompt/completion pair per chemical element (the demo's bundled data).

    python examples/make_elements_data.py

Facts (name, symbol, atomic number) are public-domain chemistry; the answer always follows one template, which a
small model learns in a few dozen steps. Every 7th element from the 3rd (17 in all) is marked `"split": "test"`.
"""

import json
from pathlib import Path

ELEMENTS = """H Hydrogen,He Helium,Li Lithium,Be Beryllium,B Boron,C Carbon,N Nitrogen,O Oxygen,F Fluorine,Ne Neon,
Na Sodium,Mg Magnesium,Al Aluminium,Si Silicon,P Phosphorus,S Sulfur,Cl Chlorine,Ar Argon,K Potassium,Ca Calcium,
Sc Scandium,Ti Titanium,V Vanadium,Cr Chromium,Mn Manganese,Fe Iron,Co Cobalt,Ni Nickel,Cu Copper,Zn Zinc,
Ga Gallium,Ge Germanium,As Arsenic,Se Selenium,Br Bromine,Kr Krypton,Rb Rubidium,Sr Strontium,Y Yttrium,
Zr Zirconium,Nb Niobium,Mo Molybdenum,Tc Technetium,Ru Ruthenium,Rh Rhodium,Pd Palladium,Ag Silver,Cd Cadmium,
In Indium,Sn Tin,Sb Antimony,Te Tellurium,I Iodine,Xe Xenon,Cs Caesium,Ba Barium,La Lanthanum,Ce Cerium,
Pr Praseodymium,Nd Neodymium,Pm Promethium,Sm Samarium,Eu Europium,Gd Gadolinium,Tb Terbium,Dy Dysprosium,
Ho Holmium,Er Erbium,Tm Thulium,Yb Ytterbium,Lu Lutetium,Hf Hafnium,Ta Tantalum,W Tungsten,Re Rhenium,Os Osmium,
Ir Iridium,Pt Platinum,Au Gold,Hg Mercury,Tl Thallium,Pb Lead,Bi Bismuth,Po Polonium,At Astatine,Rn Radon,
Fr Francium,Ra Radium,Ac Actinium,Th Thorium,Pa Protactinium,U Uranium,Np Neptunium,Pu Plutonium,Am Americium,
Cm Curium,Bk Berkelium,Cf Californium,Es Einsteinium,Fm Fermium,Md Mendelevium,No Nobelium,Lr Lawrencium,
Rf Rutherfordium,Db Dubnium,Sg Seaborgium,Bh Bohrium,Hs Hassium,Mt Meitnerium,Ds Darmstadtium,Rg Roentgenium,
Cn Copernicium,Nh Nihonium,Fl Flerovium,Mc Moscovium,Lv Livermorium,Ts Tennessine,Og Oganesson"""


def main() -> None:
    rows = []
    for number, item in enumerate(ELEMENTS.replace("\n", "").split(","), start=1):
        symbol, name = item.split()
        rows.append({
            "prompt": f"Question: Tell me about the element {name}.\nAnswer:",
            "completion": f" {name} has the chemical symbol {symbol} and atomic number {number}.",
            "split": "test" if number % 7 == 3 else "train",
        })
    assert len(rows) == 118
    out = Path(__file__).parent / "data" / "elements.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {out}: {sum(r['split'] == 'train' for r in rows)} train, {sum(r['split'] == 'test' for r in rows)} test")


if __name__ == "__main__":
    main()
