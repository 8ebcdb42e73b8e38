"""The tokens the COCO caption toolkit scores, without Java: Stanford's PTBTokenizer in pure Python.

pycocoevalcap (coco-caption) writes all captions to one file, one per line, runs Stanford CoreNLP
3.4.1's PTBTokenizer on it (`-preserveLines -lowerCase`) and drops the tokens in its PUNCTUATIONS
list. `tokenize` reproduces that for a caption: the rules below are the lexer's (PTBLexer.flex, as
in the 3.4.1 jar the toolkit ships; checked against it on COCO-style and random text), matched the
way JFlex matches them, longest match first (trailing context included) and the earlier rule on a
tie, then lower-cased and filtered. What that gives, in COCO captions:

- hyphenated words stay whole ("t-shirt", "10-year-old"); so do numbers and times ("3:30", "1,000",
  "2.5", "1/2"), abbreviations with their period ("mr.", "st.", "u.s.") and "b&w", "at&t", "c++";
- clitics split the Treebank way: "dog's" -> "dog", "'s"; "don't" -> "do", "n't"; "gonna" ->
  "gon", "na"; "cannot" -> "can", "not"; "o'clock", "ma'am", "'90s" stay whole;
- brackets become "-lrb-", "-rrb-", "-lsb-", ... and are kept ("-LRB-" is upper case in the toolkit's
  list, so its lower-cased form survives); "$", "%", "&", "#", "/", "+", "=" and the like are tokens;
- "." "," "?" "!" ":" ";" "-" "--" "..." and quotes are dropped.

The lexer sees a caption followed by the next line of the toolkit's file. Only a few tokens at the
end of a caption depend on it (a single letter with a period stays "x." unless a capitalised word
like "A" or "The" follows); `tokenize` assumes the next caption starts with "A ", as most COCO
captions do. Non-ASCII text is NFKC-normalised and typographic quotes, dashes and ellipses are read
as their ASCII forms; letters of any script (with their combining marks) make words. Two choices
differ from Java there, for a usable vocabulary: CJK ideographs are one token each (BERT's basic
tokenizer does the same; Java keeps a run of them as one token) and other non-ASCII symbols and
emoji separate words and are dropped.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import NamedTuple

# The toolkit's PUNCTUATIONS, compared after lower-casing: its "-LRB-", "-RRB-", "-LCB-", "-RCB-"
# never match there, so "-lrb-" and friends are kept.
PUNCTUATION = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
# What `tokenize` assumes follows a caption in the toolkit's file (see the module doc).
_NEXT_CAPTION = "\nA "
# CJK Unified Ideographs, extension A, compatibility ideographs, extensions B-F (BERT's ranges).
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
# A vulgar fraction is a token of its own, "3½" -> "3", "1/2", as Java's lexer has it.
_FRACTION = re.compile("[\u00bc-\u00be\u2150-\u215e]")
# Typographic forms the lexer would map to the same tokens as these ASCII ones.
_ASCII_FORMS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2039": "'", "\u203a": "'", "\u02bc": "'",
    "\u2032": "'", "\x91": "'", "\x92": "'", "\x93": '"', "\x94": '"',
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u2026": "...", "\u2044": "/", "\u00ad": "",
})  # fmt: skip


def tokenize(text: str) -> list[str]:
    """The toolkit's tokens for one caption: PTB-tokenised, lower-cased, its punctuation list dropped."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", _FRACTION.sub(_fraction, text)).translate(_ASCII_FORMS)
        text = _CJK.sub(r" \g<0> ", text)
    lexer = _ASCII if text.isascii() else _unicode_lexer()
    return [token for token in map(str.lower, lexer.tokens(text)) if token not in PUNCTUATION]


def _fraction(match: re.Match[str]) -> str:
    """"½" -> "1/2" between line breaks: separate tokens, and no space for the fraction rule to take in."""
    return "\n" + unicodedata.normalize("NFKC", match.group()).replace("\u2044", "/") + "\n"


def detokenize(tokens: Sequence[str]) -> str:
    """Tokens joined for people: "a dog 's frisbee -lrb- red -rrb-" -> "a dog's frisbee (red)"."""
    return _detokenizer()([_BRACKETS.get(token, token) for token in tokens])


_BRACKETS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}


@functools.cache
def _detokenizer() -> Callable[[list[str]], str]:
    from nltk.tokenize.treebank import TreebankWordDetokenizer  # slow to import: only once a caption is shown

    return TreebankWordDetokenizer().detokenize


# ---- the lexer ------------------------------------------------------------------------------------

_Action = Callable[[str], tuple[str, int]]  # matched token -> (token to emit, characters consumed)


def _keep(text: str) -> tuple[str, int]:
    return text, len(text)


def _as(replacement: str) -> _Action:
    return lambda text: (replacement, len(text))


def _mapped(fn: Callable[[str], str]) -> _Action:
    return lambda text: (fn(text), len(text))


def _split_off(chars: int) -> _Action:
    """Emit all but the last `chars` characters, which are lexed again ("cannot" -> "can" + "not")."""
    return lambda text: (text[:-chars], len(text) - chars)


def _period_again(text: str) -> tuple[str, int]:
    """An abbreviation ending a sentence: the token keeps its period and the period is also a token."""
    return text, len(text) - 1


def _acronym_ending_sentence(text: str) -> tuple[str, int]:
    """As `_period_again`, but a single letter ("A.") gives the letter and the period."""
    return (text[0], 1) if len(text) == 2 else (text, len(text) - 1)


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _brackets(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _amp(text: str) -> str:
    return re.sub("(?i)&amp;", "&", text)


def _dashes(text: str) -> str:
    return "--" if 3 <= len(text) <= 4 else text


class _Rule(NamedTuple):
    first: str  # a regex class: the characters a match can start with
    pattern: str  # a group named "t", if any, is the token; the rest is trailing context
    action: _Action = _keep


class _Grammar(NamedTuple):
    rules: list[_Rule]
    abbreviation: str  # the letter-only words that may take a period as part of the token ("mr", "etc", "x")


def _grammar(letter: str, digit: str) -> _Grammar:
    """PTBLexer's rules in its order, on `letter`/`digit` where Java uses [:letter:]/[:digit:]."""
    L, D = f"(?:{letter})", f"(?:{digit})"
    LD = f"(?:{L}|{D})"
    space = r"[ \t\u00a0\u2000-\u200a\u3000]"
    spacenl = rf"(?:{space}|\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
    apos = r"(?:['\x92\u2019]|&apos;)"
    apos_etc = rf"(?:{apos}|[`\x91\u2018\u201b])"
    name = r"[A-Za-z][A-Za-z0-9_:.-]*"
    attribute = rf"{name}(?: *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|{name}))?"
    sgml = rf"<(?:[!?][A-Za-z-][^>\r\n]*|{name}(?: +{attribute})* */?|/{name}) *>"
    num = rf"(?:{D}+(?:[.:,]{D}+)*|(?:[.:,]{D}+)+)"
    acro = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r)))"
    # Abbreviations (induced from the WSJ by Stanford); a capital in [] is matched case-sensitively.
    ab_state = ("(?i:ala|ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn"
                "|va|vt|wisc?|wyo)|A(?i:rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass)|M(?i:iss)|O(?i:re)|P(?i:a)|T(?i:ex)"
                "|W(?i:ash)")
    ab_other = ("jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"  # months, days
                "|inc|cos?|corp|pp?tys?|ltd|plc|bancorp|bhd|assn|univ|intl|sys"  # companies
                r"|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg")
    abbrev1 = rf"(?:(?i:{ab_other})|{ab_state})\."  # usually followed by a lower-case word
    title = ("(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt"
             "|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr"
             "|sfc|rt|invt|elec|natl|m[ft]g|dept|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph)|M(?i:iss)")
    abbrev4 = rf"(?:{acro}|[A-Za-z]|{title})"  # abbrev4 + "." is usually followed by a capital
    abbrev3_word = "(?i:ca|figs?|prop|nos?|art|bldg|pp|op)"  # + "." before a number only
    abbrev3 = rf"{abbrev3_word}\."
    sentend = rf"{spacenl}(?:{spacenl}|[A-Z]|{sgml})"
    sentence_start = "|".join(  # capitalised words that say an acronym ended the sentence
        f"{word[0]}(?i:{word[1:]})" if len(word) > 1 else word
        for word in (
            "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More"
            r" Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Then There These They This We When"
            " While What Yet You"
        ).split()
    )
    redaux = rf"{apos}(?:[msdMSD]|(?i:re|ve|ll))"
    sredaux = rf"[nN]{apos_etc}[tT]"
    word = rf"{L}{LD}*(?:[.!?]{L}{LD}*)*"
    thing_part = rf"(?:[dDoOlL]{apos_etc}{LD})?{LD}+"
    thing = rf"{thing_part}(?:[-_]{thing_part})*"
    thinga = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
    thing3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    hthing = rf"[A-Za-z0-9][A-Za-z0-9.,]*(?:-(?:{acro}\.|[A-Za-z0-9]+))+"
    extension = ("bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php"
                 "|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv|mp[34g]")
    filename = rf"{LD}+(?:\.{LD}+)*\.(?i:{extension})"
    insentp = "[,;:]"
    url_end = r'[^ \t\n\f\r"<>|.!?(){},-]'
    url_path = rf'(?:/[^ \t\n\f\r"<>|()]+{url_end})?'
    host = r'[^ \t\n\f\r"`\'<>|.!?(){}\x2c-\x5f$]'  # (sic: ",-_" is a range in PTBLexer, digits included)
    email_part = r'[^ \t\n\f\r"<>|(){}\u00a0]'
    letters, alnum, apos_first = "[A-Za-z]", "[A-Za-z0-9]", "['&\x92\u2019]"
    R = _Rule
    rules = [
        R("[cCfF]", r"(?i:c\+\+|[cf]#)"),
        R("[cC']", "(?i:cannot|'twas)", _split_off(3)),
        R("[gGlLwW']", "(?i:gonna|gotta|lemme|gimme|wanna|'tis)", _split_off(2)),
        R("<", sgml, _mapped(_nbsp)),
        R("&", "&(?i:md|mdash|ndash);", _as("--")),
        R("&", "(?i:&amp;)", _as("&")),
        R("&", "&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"),
        R(letters, rf"(?P<t>{word}){redaux}"),
        R(letters, rf"(?P<t>[A-Za-z]*[A-MO-Za-mo-z]){sredaux}"),
        R(letters, word),
        # Words with an apostrophe that stay whole.
        R(apos_first, rf"{apos}[nN]{apos}?|{apos}(?i:em|till?|cause)|{apos}[2-9]0(?i:s)"),
        R("[lLdDjJ]", rf"[lLdDjJ]{apos}"),
        R("[dDsSoO]", rf"(?i:dunkin|somethin|ol){apos}"),
        R("[A-HJ-XZn]", rf"[A-HJ-XZn]{apos_etc}{L}{L}+"),
        R(letters, rf"{L}+?[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{L}*"),
        R("[cCoOnNeEsSlL']", r"(?i:cont'd\.?|'twas|o'o|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"),
        R("[yY]", rf"(?P<t>[yY]{apos}){L}"),
        # URLs, e-mail addresses, Twitter names and hashtags.
        R("[hH]", rf'(?i:https?)://[^ \t\n\f\r"<>|()]+{url_end}'),
        R("[wW]", rf'(?i:www)\.(?:[^ \t\n\f\r"<>|.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}{url_path}'),
        R(host, rf"(?:{host}+\.)+(?i:com|net|org|edu){url_path}"),
        R("[<&A-Za-z0-9]", rf"(?:<|(?i:&lt;))?[a-zA-Z0-9]{email_part}*@(?:[^ \t\n\f\r\"<>|(){{}}.\u00a0]+\.)*"
                           rf"[^ \t\n\f\r\"<>|(){{}}.\u00a0]+(?:>|(?i:&gt;))?"),
        R("@", "@[a-zA-Z_][a-zA-Z_0-9]*"),
        R("#", f"#{L}+"),
        R(apos_first, rf"(?P<t>{redaux})[^A-Za-z]"),
        R("[nN]", sredaux),
        # Numbers, dates, fractions, money.
        R("[0-9]", rf"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}"),
        R("[-+.:,0-9]", rf"[-+]?{num}"),
        R("[0-9]", rf"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\?/|\u2044){D}{{1,4}}", _mapped(_nbsp)),
        R("[-cCpPaAsS]", r"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
                         rf"|(?i:cap){apos}[nN]|[cC]{apos}(?i:est)", _mapped(_amp)),
        R(alnum, thing3),
        R("[A-Z$#]", r"[A-Z]*\$|#"),
        # Abbreviations and acronyms, some decided by what follows.
        R(letters, rf"(?P<t>[A-Za-z](?:\.[A-Za-z])*\.){spacenl}+(?:{sentence_start}|{sgml}){spacenl}",
          _acronym_ending_sentence),
        R(letters, rf"(?P<t>{abbrev3}){spacenl}?{D}"),
        R(letters, rf"(?P<t>{abbrev1}){sentend}", _period_again),
        R(letters, rf"(?P<t>{abbrev1})[\s\S]{{2}}"),
        R(letters, abbrev1, _period_again),
        R(letters, rf"{abbrev4}\."),
        R(letters, rf"(?P<t>{abbrev4}){space}"),
        R(letters, rf"(?P<t>{acro}){spacenl}"),
        R(apos_first, rf"(?P<t>{apos}{D}{D}){spacenl}"),
        R(alnum, rf"(?P<t>{filename})(?:{spacenl}|[.?!,])"),
        R(letters, rf"(?P<t>{word}\.){insentp}"),
        R(r"[(]", r"\([0-9]{2,3}\)[ \u00a0]?[0-9]{3,4}[- \u00a0]?[0-9]{3,5}", _mapped(lambda t: _brackets(_nbsp(t)))),
        R("[+0-9]", r"(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0][0-9]{3,4}[- \u00a0]?[0-9]{3,5}",
          _mapped(_nbsp)),
        R("[+0-9]", r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"),
        # Quotes, smileys, brackets and other punctuation.
        R('["&]', r'(?P<t>"|(?i:&quot;))[A-Za-z0-9$]', _as("``")),
        R('["&]', r'"|(?i:&quot;)', _as("''")),
        R("[<>:;=]", r"(?P<t>[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]", _mapped(_brackets)),
        R("[<>]", "<<|>>"),
        R(r"[-^x=~<>'(]", r"[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)",
          _mapped(_brackets)),
        R(r"[+%&~^|\\]", r"[+%&~^|\\]"),
        R("[<&]", "<|(?i:&lt;)"),
        R("[>&]", ">|(?i:&gt;)"),
        R(r"\[", r"\[", _as("-LSB-")),
        R(r"\]", r"\]", _as("-RSB-")),
        R("{", "{", _as("-LCB-")),
        R("}", "}", _as("-RCB-")),
        R(r"\(", r"\(", _as("-LRB-")),
        R(r"\)", r"\)", _as("-RRB-")),
        R("-", "-+", _mapped(_dashes)),
        R("[.]", r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.", _as("...")),
        R("[@#_]", "@+|#+|_+"),
        R(r"[*\\]", r"\*+|(?:\\\*){1,3}"),
        R(insentp, insentp),
        R("[?!]", "[?!]+"),
        R("[.=/]", "[.=/]"),
        # Hyphenated and other compound words.
        R(alnum, rf"(?P<t>{hthing}\.){insentp}"),
        R(alnum, hthing),
        R(alnum, rf"(?P<t>{thing}\.){insentp}"),
        R(alnum, thing),
        R("[A-Z]", rf"(?P<t>{thinga}\.){insentp}", _mapped(_amp)),
        R("[A-Z]", thinga, _mapped(_amp)),
        R("'", r"(?P<t>')[A-Za-z][^ \t\n\r\u00a0]", _as("`")),
        R(apos_first, redaux),
        R("['`&]", rf"''|`{{1,2}}|{apos}", _mapped(lambda t: t.replace("&apos;", "'"))),
    ]  # fmt: skip
    return _Grammar(rules, f"(?:(?i:{ab_other})|{ab_state}|{abbrev3_word}|{abbrev4})")


class _Lexer:
    """The rules compiled, indexed by the first character a match can start with (ASCII only)."""

    # The assimilations: their rules tie with the word rule and come first, so they split.
    _SPLIT = {"cannot": 3, "gonna": 2, "gotta": 2, "lemme": 2, "gimme": 2, "wanna": 2}

    def __init__(self, letter: str, digit: str) -> None:
        grammar = _grammar(letter, digit)
        rules = [(re.compile(rule.pattern), rule.action, re.compile(rule.first)) for rule in grammar.rules]
        self._all = [(pattern, action) for pattern, action, _ in rules]
        self._by_first = [[(p, a) for p, a, first in rules if first.fullmatch(chr(c))] for c in range(128)]
        # Fast paths, for most of a caption's words: a run of letters is one word token whichever rule
        # wins when a space follows it, or one of , ; : ? ! or a period (unless the letters are an
        # abbreviation) and then a space. No rule starting with a letter reaches past that space, and
        # those that take such punctuation need more characters after it ("x.y", "etc.,", "http:").
        self._plain = re.compile(rf"\s*((?:(?:{letter})+\s+)*((?:{letter})+))(\.?)\s*")  # a whole caption
        self._letters = re.compile(f"(?:{letter})+")
        self._punctuation = re.compile(r"(?:[,;:]|[?!]+|(\.))(?=\s)")
        self._abbreviation = re.compile(grammar.abbreviation)
        self._assimilation = re.compile(f"(?i:{'|'.join(self._SPLIT)})")

    def tokens(self, text: str) -> list[str]:
        """PTB tokens of `text`, as the lexer gives them (case kept, punctuation included)."""
        plain = self._plain.fullmatch(text)
        if plain and not (plain.group(3) and self._abbreviation.fullmatch(plain.group(2))):
            words = plain.group(1).split()
            if self._assimilation.search(plain.group(1)):
                words = [part for word in words for part in self._split(word)]
            return [*words, "."] if plain.group(3) else words
        end = len(text)
        text += _NEXT_CAPTION
        out: list[str] = []
        pos = 0
        while pos < end:
            char = text[pos]
            if char.isspace():
                pos += 1
                continue
            letters = self._letters.match(text, pos)
            if letters and self._is_word(letters, text):
                out.extend(self._split(letters.group()))
                pos = letters.end()
                continue
            best, best_len, best_action = None, 0, _keep
            for pattern, action in self._by_first[ord(char)] if ord(char) < 128 else self._all:
                match = pattern.match(text, pos)
                if match and match.end() - pos > best_len:
                    best, best_len, best_action = match, match.end() - pos, action
            if best is None:  # a character no rule knows: dropped, as the toolkit's lexer does
                pos += 1
                continue
            token, consumed = best_action(best.group("t") if "t" in best.re.groupindex else best.group())
            out.append(token)
            pos += consumed
        return out

    def _is_word(self, letters: re.Match[str], text: str) -> bool:
        """Whether a run of letters is a token by itself (the fast path in `__init__`)."""
        end = letters.end()
        if text[end].isspace():
            return True
        after = self._punctuation.match(text, end)
        return after is not None and not (after.group(1) and self._abbreviation.fullmatch(letters.group()))

    def _split(self, word: str) -> tuple[str, ...]:
        cut = self._SPLIT.get(word.lower())
        return (word[:-cut], word[-cut:]) if cut else (word,)


_ASCII = _Lexer("[A-Za-z]", "[0-9]")


@functools.cache
def _unicode_lexer() -> _Lexer:
    """Letters of every script with their combining marks (`re` has no \\p{M}: the class is built once)."""
    ranges, start = [], None
    for code in range(sys.maxunicode + 2):
        is_mark = code <= sys.maxunicode and unicodedata.category(chr(code)).startswith("M")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    return _Lexer(f"[^\\W\\d_]|[{''.join(ranges)}]", r"\d")
