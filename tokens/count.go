package tokens

import (
	"encoding/binary"
	"unicode/utf8"

	"github.com/valyala/fastjson"
)

// charsPerTokenID is what one token id in a pre-tokenised prompt adds to
// PromptChars: an id is exactly one token, and estimators divide by about
// four characters per token.
const charsPerTokenID = 4

// countRunes returns the runes in b and how many of them are CJK. Prompt
// text is mostly ASCII, so eight bytes are checked at a time; invalid UTF-8
// counts one rune per bad byte, as utf8.DecodeRune reports it.
func countRunes(b []byte) (n, cjk int64) {
	i := 0
	for i < len(b) {
		for i+8 <= len(b) && binary.LittleEndian.Uint64(b[i:])&highs == 0 {
			i += 8
			n += 8
		}
		if i >= len(b) {
			break
		}
		if c := b[i]; c < utf8.RuneSelf {
			i++
			n++
			continue
		}
		r, size := utf8.DecodeRune(b[i:])
		i += size
		n++
		if isCJK(r) {
			cjk++
		}
	}
	return n, cjk
}

// isCJK reports Han, Hiragana/Katakana and Hangul, the scripts that
// tokenisers split at about one token per rune.
func isCJK(r rune) bool {
	switch {
	case r < 0x1100:
		return false
	case r <= 0x11FF: // Hangul Jamo
		return true
	case r < 0x3040:
		return false
	case r <= 0x30FF: // Hiragana, Katakana
		return true
	case r < 0x3400:
		return false
	case r <= 0x4DBF: // CJK Extension A
		return true
	case r < 0x4E00:
		return false
	case r <= 0x9FFF: // CJK Unified Ideographs
		return true
	case r < 0xAC00:
		return false
	case r <= 0xD7AF: // Hangul Syllables
		return true
	case r < 0xF900:
		return false
	case r <= 0xFAFF: // CJK Compatibility Ideographs
		return true
	}
	return 0x20000 <= r && r <= 0x2FA1F // Extensions B–F, Compatibility Supplement
}

// addBytes counts b as prompt text.
func addBytes(req *Request, b []byte) {
	n, cjk := countRunes(b)
	req.PromptChars += n
	req.PromptCJK += cjk
}

// addString counts v when it is a string and ignores anything else.
func addString(req *Request, v *fastjson.Value) {
	if v == nil || v.Type() != fastjson.TypeString {
		return
	}
	b, _ := v.StringBytes()
	addBytes(req, b)
}

// addStringsOrIDs counts a prompt given as a string, an array of strings,
// an array of token ids or an array of such arrays (OpenAI completions
// prompt and embeddings input; Ollama embed input).
func addStringsOrIDs(req *Request, v *fastjson.Value) {
	if v == nil {
		return
	}
	switch v.Type() {
	case fastjson.TypeString:
		addString(req, v)
	case fastjson.TypeArray:
		for _, e := range v.GetArray() {
			switch e.Type() {
			case fastjson.TypeString:
				addString(req, e)
			case fastjson.TypeNumber:
				req.PromptChars += charsPerTokenID
			case fastjson.TypeArray:
				req.PromptChars += charsPerTokenID * int64(len(e.GetArray()))
			}
		}
	}
}

// addJSON counts structured tool arguments. A string (OpenAI's
// function.arguments) is the JSON text itself; an object or array (Ollama,
// Anthropic and Gemini send them decoded) is re-serialised into scratch,
// because the model reads it as JSON text, punctuation included.
func (p *Parser) addJSON(req *Request, v *fastjson.Value) {
	if v == nil {
		return
	}
	switch v.Type() {
	case fastjson.TypeString:
		addString(req, v)
	case fastjson.TypeObject, fastjson.TypeArray:
		p.scratch = v.MarshalTo(p.scratch[:0])
		addBytes(req, p.scratch)
	}
}
