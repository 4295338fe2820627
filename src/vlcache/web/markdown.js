// Model text as Markdown, made safe: marked turns it into HTML, DOMPurify removes everything that could run
// (scripts, event handlers, javascript: URLs, frames, forms), and only DOMPurify's result reaches the page.
// The page's Content-Security-Policy is a second wall: no inline script would run even if something slipped.

const { Marked } = window.marked;  // vendor/marked.min.js (UMD)
const purify = window.DOMPurify;  // vendor/purify.min.js

const markdown = new Marked({ gfm: true, breaks: true, async: false });

const PURIFY = {
  USE_PROFILES: { html: true },  // HTML only: no SVG or MathML, where most sanitizer bypasses live
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "dialog"],
  FORBID_ATTR: ["style", "id", "name"],  // no restyling the page, no clobbering its elements by id
  RETURN_DOM_FRAGMENT: true,
};

// Links the model writes open elsewhere and get no access to this page.
purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Replace `element`'s children with `text` rendered as sanitized Markdown. */
export function renderMarkdown(element, text) {
  const html = markdown.parse(text || "");
  element.replaceChildren(purify.sanitize(html, PURIFY));
}
