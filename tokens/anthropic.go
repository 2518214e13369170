package tokens

import (
	"strings"

	"github.com/valyala/fastjson"
)

// routeAnthropic matches /v1/messages as the last segments. Its siblings
// /v1/messages/count_tokens and /v1/messages/batches do not generate
// tokens synchronously and are left alone.
func routeAnthropic(path string) (Dialect, Endpoint) {
	if strings.HasSuffix(path, "/v1/messages") {
		return DialectAnthropic, EndpointMessages
	}
	return DialectUnknown, EndpointUnknown
}

// parseAnthropic reads a Messages API body. It returns the body's model,
// which borrows the parser's buffer.
func (p *Parser) parseAnthropic(root *fastjson.Value, useBodyModel bool, req *Request) (model []byte, err error) {
	var system, messages *fastjson.Value
	root.GetObject().Visit(func(k []byte, v *fastjson.Value) {
		if err != nil {
			return
		}
		switch string(k) {
		case "model":
			if useBodyModel {
				model, err = stringField(v, "model")
			}
		case "stream":
			req.Stream, _, err = boolField(v, "stream")
		case "max_tokens":
			req.MaxOutputTokens, _, err = p.intField(v, "max_tokens", false, false)
		case "system":
			system = v
		case "messages":
			messages = v
		}
	})
	if err != nil {
		return nil, err
	}
	p.countAnthropicContent(req, system)
	for _, m := range array(messages) {
		p.countAnthropicContent(req, last(m, "content"))
	}
	return model, nil
}

// countAnthropicContent counts a system prompt or message content: a
// string, or content blocks. Image blocks and base64 documents are skipped
// because they are not tokenised as text.
func (p *Parser) countAnthropicContent(req *Request, content *fastjson.Value) {
	if content == nil {
		return
	}
	if content.Type() == fastjson.TypeString {
		addString(req, content)
		return
	}
	for _, block := range array(content) {
		var typ, text, input, inner, source *fastjson.Value
		visit(block, func(k []byte, v *fastjson.Value) {
			switch string(k) {
			case "type":
				typ = v
			case "text":
				text = v
			case "input":
				input = v
			case "content":
				inner = v
			case "source":
				source = v
			}
		})
		switch {
		case isString(typ, "text"):
			addString(req, text)
		case isString(typ, "tool_use"):
			// The model reads the call it made back as JSON.
			p.addJSON(req, input)
		case isString(typ, "tool_result"):
			if inner != nil && inner.Type() == fastjson.TypeString {
				addString(req, inner)
			} else {
				// Nested blocks are text or images; recursion stops here
				// because tool results cannot contain tool results.
				for _, b := range array(inner) {
					if isString(last(b, "type"), "text") {
						addString(req, last(b, "text"))
					}
				}
			}
		case isString(typ, "document"):
			// Plain-text documents are read as text; base64 PDFs and
			// URLs are not.
			if isString(last(source, "type"), "text") {
				addString(req, last(source, "data"))
			}
		}
	}
}
